"""Plotly figures and byte formatting shared by the tabs.

Every memory chart uses the categories of estimator/constants.py in one fixed order and color, so a bar in the Plan
tab and a bar in the Train tab read the same way.
"""

from __future__ import annotations

import plotly.graph_objects as go

from estimator.estimate import CATEGORIES

CATEGORY_COLORS = {"weights": "#4c78a8", "adapters": "#f58518", "gradients": "#e45756", "optimizer": "#72b7b2",
                   "activations": "#54a24b", "transient": "#b279a2", "overhead": "#bab0ac"}
METHOD_COLORS = {"full": "#4c78a8", "lora": "#f58518", "qlora": "#e45756", "galore": "#54a24b",
                 "qgalore": "#b279a2"}
OTHER_COLORS = ["#9d755d", "#eeca3b", "#ff9da6", "#79706e", "#72b7b2", "#4c78a8"]
MiB, GiB = 2**20, 2**30


def unit(largest: float) -> tuple[str, int]:
    """GiB for big numbers, MiB below one GiB."""
    return ("GiB", GiB) if largest >= GiB else ("MiB", MiB)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if abs(n) < 1024:
        return f"{n:,.0f} B" if n else "0"
    if abs(n) < MiB:
        return f"{n / 1024:,.1f} KiB"
    name, div = unit(abs(n))
    return f"{n / div:,.2f} {name}"


def color_for(label: str, index: int) -> str:
    method = label.split(" ")[0]
    return METHOD_COLORS.get(method, OTHER_COLORS[index % len(OTHER_COLORS)])


def _layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    fig.update_layout(title=title, template="plotly_white", height=kw.pop("height", 380),
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.18), **kw)
    return fig


def empty_figure(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#888"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title)


def gpu_line(fig: go.Figure, gpu, div: int, xs: list | None = None) -> None:
    """A dashed line at the GPU's memory: across the bars, or as a trace over `xs` (log axes too)."""
    if gpu is None:
        return
    if xs is None:
        fig.add_hline(y=gpu.memory_bytes / div, line_dash="dash", line_color="#d62728",
                      annotation_text=gpu.name, annotation_position="top left")
    else:
        fig.add_scatter(x=[xs[0], xs[-1]], y=[gpu.memory_bytes / div] * 2, name=gpu.name, mode="lines",
                        line=dict(color="#d62728", dash="dash"), hoverinfo="name")


def breakdown_figure(estimates: dict[str, dict], gpu=None, labels: dict[str, str] | None = None) -> go.Figure:
    """One stacked bar per method: the allocated peak by category, overhead on top, apart.

    `estimates`: key -> Estimate.to_dict(). `labels`: key -> the name the axis and hovers show
    (the bars stay keyed by `key`, e.g. "qgalore" shown as "Q-GaLore")."""
    if not estimates:
        return empty_figure("Peak memory by category", "no estimate")
    largest = max(e["peak_bytes"] + e["overhead_bytes"] for e in estimates.values())
    name, div = unit(max(largest, gpu.memory_bytes if gpu else 0))
    keys = list(estimates)
    shown = [(labels or {}).get(k, k) for k in keys]
    fig = go.Figure()
    for cat in CATEGORIES:
        fig.add_bar(name=cat, x=keys, y=[estimates[m]["breakdown"][cat] / div for m in keys], customdata=shown,
                    marker_color=CATEGORY_COLORS[cat],
                    hovertemplate=f"%{{customdata}} · {cat}: %{{y:,.3f}} {name}<extra></extra>")
    if any(e["overhead_bytes"] for e in estimates.values()):
        fig.add_bar(name="overhead (not allocated)", x=keys, customdata=shown,
                    y=[estimates[m]["overhead_bytes"] / div for m in keys],
                    marker_color=CATEGORY_COLORS["overhead"], marker_pattern_shape="/",
                    hovertemplate=f"%{{customdata}} · CUDA context + allocator slack: %{{y:,.3f}} {name}<extra></extra>")
    gpu_line(fig, gpu, div)
    fig.update_layout(barmode="stack", yaxis_title=name)
    fig.update_xaxes(type="category", tickmode="array", tickvals=keys, ticktext=shown)
    return _layout(fig, "Peak memory of one training step, by category")


def sweep_figure(xs: list[int], series: dict[str, list[int | None]], axis: str, gpu=None,
                 labels: dict[str, str] | None = None) -> go.Figure:
    """Memory needed (peak + overhead) against one setting, one line per method.

    `series`: key -> values; `labels`: key -> the legend's name (the color follows the key)."""
    values = [v for ys in series.values() for v in ys if v is not None]
    if not values:
        return empty_figure(f"Memory against {axis}", "nothing to sweep")
    name, div = unit(max(values + ([gpu.memory_bytes] if gpu else [])))
    fig = go.Figure()
    for i, (key, ys) in enumerate(series.items()):
        label = (labels or {}).get(key, key)
        fig.add_scatter(x=xs, y=[None if y is None else y / div for y in ys], name=label, mode="lines+markers",
                        line_color=color_for(key, i),
                        hovertemplate=f"{label} · {axis} %{{x}}: %{{y:,.2f}} {name}<extra></extra>")
    gpu_line(fig, gpu, div, xs)
    fig.update_xaxes(type="log", title=axis, tickvals=xs, ticktext=[str(x) for x in xs])
    fig.update_yaxes(title=f"{name} needed (peak + overhead)", type="log")
    return _layout(fig, f"Memory against {axis}")


def loss_figure(runs: dict[str, list[dict]]) -> go.Figure:
    """Training loss per step of every run, eval losses as markers."""
    if not any(runs.values()):
        return empty_figure("Loss", "start a run to see its loss curve")
    fig = go.Figure()
    for i, (label, metrics) in enumerate(runs.items()):
        color = color_for(label, i)
        fig.add_scatter(x=[m["step"] for m in metrics], y=[m["loss"] for m in metrics], name=label, mode="lines",
                        line_color=color, legendgroup=label)
        evals = [m for m in metrics if m.get("eval_loss") is not None]
        if evals:
            fig.add_scatter(x=[m["step"] for m in evals], y=[m["eval_loss"] for m in evals], name=f"{label} (eval)",
                            mode="markers+lines", line=dict(color=color, dash="dot"), marker_size=8,
                            legendgroup=label, showlegend=False)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss")
    return _layout(fig, "Loss (dotted: eval loss)")


RANK_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "x", "star", "pentagon")


def memory_figure(runs: dict[str, list[dict]], predicted: dict[str, int | None]) -> go.Figure:
    """Measured peak memory of each step, with each run's predicted peak (per GPU) as a dashed
    line; a run on several ranks draws a line per rank."""
    values = [m["memory_peak_bytes"] for ms in runs.values() for m in ms if m.get("memory_peak_bytes")]
    if not values:
        return empty_figure("Memory per step", "start a run to see its memory")
    name, div = unit(max(values + [p for p in predicted.values() if p]))
    fig = go.Figure()
    for i, (label, metrics) in enumerate(runs.items()):
        color = color_for(label, i)
        ranks = max((len(m.get("memory_peak_ranks") or ()) for m in metrics), default=0)
        if ranks > 1:  # a line per rank, each with its own marker
            for rank in range(ranks):
                points = [m for m in metrics if len(m.get("memory_peak_ranks") or ()) > rank]
                fig.add_scatter(x=[m["step"] for m in points],
                                y=[m["memory_peak_ranks"][rank] / div for m in points], name=f"{label} · rank {rank}",
                                mode="lines+markers", line_color=color, marker_size=6, legendgroup=label,
                                marker_symbol=RANK_SYMBOLS[rank % len(RANK_SYMBOLS)])
        else:
            fig.add_scatter(x=[m["step"] for m in metrics],
                            y=[(m.get("memory_peak_bytes") or 0) / div for m in metrics],
                            name=label, mode="lines+markers", line_color=color, marker_size=4, legendgroup=label)
        if predicted.get(label) and metrics:
            fig.add_scatter(x=[1, max(m["step"] for m in metrics)], y=[predicted[label] / div] * 2,
                            name=f"{label} predicted", mode="lines", line=dict(color=color, dash="dash"),
                            legendgroup=label, showlegend=False)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title=f"peak {name} of the step")
    return _layout(fig, "Memory per step (dashed: predicted peak)")


def short_layer(name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> 3.q_proj"""
    parts = name.removesuffix(".weight").split(".")
    index = next((p for p in parts if p.isdigit()), "")
    return f"{index}.{parts[-1]}" if index else parts[-1]


def layers_figure(layers: dict[str, dict]) -> go.Figure:
    """GaLore / Q-GaLore: each projected layer's current subspace refresh gap (steps)."""
    if not layers:
        return empty_figure("Subspace refresh gap per layer", "GaLore and Q-GaLore runs show each layer's gap here")
    fig = go.Figure()
    for i, (label, info) in enumerate(layers.items()):
        fig.add_bar(x=[short_layer(n) for n in info["names"]], y=info["gap"], name=label,
                    marker_color=color_for(label, i),
                    customdata=info.get("svd_count"),
                    hovertemplate=f"{label} · %{{x}}: gap %{{y}} steps, %{{customdata}} SVDs<extra></extra>")
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="layer (block.linear)")
    fig.update_yaxes(title="steps between refreshes")
    return _layout(fig, "Steps between subspace refreshes, per layer")


def comparison_figure(pairs: dict[str, tuple[dict, dict | None]],
                      title: str = "Predicted vs measured, by category") -> go.Figure:
    """Per label, a predicted and a measured stacked bar side by side. `pairs`: label -> (predicted, measured)."""
    pairs = {k: v for k, v in pairs.items() if v[0] is not None}
    if not pairs:
        return empty_figure(title, "predicted and measured memory appear here when a run ends")
    largest = max(max(p["peak_bytes"], (m or {}).get("peak_bytes", 0)) for p, m in pairs.values())
    name, div = unit(largest)
    xs = [[], []]
    bars = []
    for label, (predicted, measured) in pairs.items():
        for kind, data in (("predicted", predicted), ("measured", measured)):
            if data is not None:
                xs[0].append(label)
                xs[1].append(kind)
                bars.append(data)
    fig = go.Figure()
    for cat in CATEGORIES:
        fig.add_bar(name=cat, x=xs, y=[b["breakdown"].get(cat, 0) / div for b in bars],
                    marker_color=CATEGORY_COLORS[cat],
                    hovertemplate=f"%{{x}} · {cat}: %{{y:,.3f}} {name}<extra></extra>")
    fig.update_layout(barmode="stack", yaxis_title=name)
    return _layout(fig, title)
