"""The Dry run tab: "measure" a 7B or 70B training step on fake tensors, beside the estimate —
on one GPU, or as rank 0 of an N-GPU job under any sharding.

The step runs in a worker process (lowrank.worker, `python -m lowrank.train --dry-run`, see
lowrank/dryrun.py): fake tensors allocate nothing but the memory tracker counts them as real
ones, so a laptop measures a 70B model's step. The estimate shows at once; the measurement
follows in 10-30 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from estimator.config import MethodConfig, TrainSetup
from estimator.estimate import estimate
from estimator.spec import preset_names
from lowrank.device import FAKE_CUDA_FALLBACK, resolve_device
from lowrank.recipe import RunSpec
from lowrank.report import comparison_rows
from lowrank.worker import start_run

from .charts import comparison_figure, empty_figure, fmt_bytes
from .widgets import METHOD_LABELS, configs_and_setup, method_options_block, setup_widgets, show_selected

TIMEOUT_S = 1800


def fake_device(device: str) -> tuple[str, str]:
    """(device the fake tensors use, a note when CUDA falls back to CPU)."""
    used = resolve_device(device, fake=True).type
    return used, (FAKE_CUDA_FALLBACK if used != device else "")


def breakdown_table(predicted: dict, measured: dict | None) -> pd.DataFrame:
    """lowrank.report's rows: each category and the peak, measured beside estimated."""
    return pd.DataFrame([{"category": row.name, "measured (fake tensors)": fmt_bytes(row.measured),
                          "estimated": fmt_bytes(row.predicted),
                          "estimated − measured": "—" if row.measured is None else fmt_bytes(row.predicted - row.measured),
                          "error": "—" if row.error is None else f"{100 * row.error:+.2f}%"}
                         for row in comparison_rows(predicted, measured)])


def measure(model: str, cfg: MethodConfig, setup: TrainSetup, device: str, out: Path) -> dict:
    """The dry run in a worker process; its summary (predicted and measured). ValueError with its message."""
    run = start_run(RunSpec(model, cfg, setup, out=str(out), steps=1, device=device), dry_run=True)
    final = list(run.events(timeout=TIMEOUT_S))[-1]
    if final["type"] != "summary":
        raise ValueError(final.get("message") or "the dry run was stopped")
    return final["summary"]


def dry_run_steps(model: str, cfg: MethodConfig, setup: TrainSetup, device: str, root: Path) -> Iterator[tuple]:
    """(figure, table, status): first the estimate alone, then beside the measurement."""
    model = (model or "").strip()
    used, note = fake_device(device)
    predicted = estimate(model, cfg, setup, device=used).to_dict()  # checks model and options at once
    label = f"{model} · {cfg.method}"
    ranks = ""
    if setup.gpus > 1:
        label += f" · {setup.gpus} GPUs, shard {setup.shard}" + (", CPU offload" if setup.cpu_offload else "")
        ranks = (f" as rank 0 of {setup.gpus} (fake process group; per GPU: batch {setup.per_gpu_batch}"
                 + (", and under ZeRO-1 each rank owns other states: the estimate is the largest rank's"
                    if setup.shard == "optimizer" else "") + ")")
    yield (comparison_figure({label: (predicted, None)}), breakdown_table(predicted, None),
           f"Estimated peak **{fmt_bytes(predicted['peak_bytes'])}** per GPU in {predicted['moment']}. Measuring one "
           f"step on fake {used.upper()} tensors{ranks}…" + (f"\n\n_{note}_" if note else ""))
    begin = time.perf_counter()
    out = root / ".dryrun" / f"{time.strftime('%Y%m%d-%H%M%S')}-{model.replace('/', '--')}-{cfg.method}"
    summary = measure(model, cfg, setup, used, out)
    measured = summary["measured"]
    error = (predicted["peak_bytes"] - measured["peak_bytes"]) / measured["peak_bytes"]
    status = (f"**{label}**: measured peak **{fmt_bytes(measured['peak_bytes'])}** in {measured['phase']} "
              f"(fake {used.upper()} tensors{ranks}, {time.perf_counter() - begin:.0f} s); estimate "
              f"{fmt_bytes(predicted['peak_bytes'])} ({100 * error:+.2f}%).")
    if "host" in measured:  # CPU offload: the shards' host memory, apart from the GPU's peak
        status += (f" Host memory (CPU offload, the offloaded shards): measured {fmt_bytes(measured['host']['peak_bytes'])}, "
                   f"estimated {fmt_bytes(predicted['host']['peak_bytes'])}.")
    yield (comparison_figure({label: (summary["predicted"], measured)}),
           breakdown_table(summary["predicted"], measured),
           status + (f"\n\n_{note}_" if note else ""))


def create_dryrun_tab(root: Path) -> None:
    """Layout and events of the Dry run tab (call inside a gr.Tab)."""
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            model = gr.Dropdown(preset_names(), value="llama-7b", allow_custom_value=True, label="model",
                                info="a preset, a config.json path or a hub id")
            method = gr.Dropdown([(METHOD_LABELS[m], m) for m in METHOD_LABELS], value="lora", label="method")
            device = gr.Dropdown(["cuda", "cpu"], value="cuda", label="fake device")
            setup = setup_widgets(batch_size=1, seq_len=256, prefix="dryrun")
            accordions, options = method_options_block(selected=("lora",), prefix="dryrun")
            run = gr.Button("Dry run", variant="primary", elem_id="dryrun-start")
        with gr.Column(scale=5):
            status = gr.Markdown("Press **Dry run**: one step of the real training code on fake tensors.",
                                 elem_id="dryrun-status")
            chart = gr.Plot(empty_figure("Estimated vs measured, by category", "press Dry run"),
                            show_label=False, label="estimated vs measured", elem_id="dryrun-chart")
            table = gr.DataFrame(label="by category", elem_id="dryrun-table",
                                 headers=["category", "measured (fake tensors)", "estimated", "estimated − measured",
                                          "error"])

    def start(model_name: str, method_name: str, device_name: str, **values):
        try:
            (cfg,), setup_ = configs_and_setup([method_name], values)
            yield from dry_run_steps(model_name, cfg, setup_, device_name, root)
        except ValueError as err:
            raise gr.Error(str(err), title="Dry run failed") from None

    method.change(lambda m: show_selected(accordions)([m]), method, list(accordions.values()), queue=False,
                  api_visibility="private")
    run.click(start, [model, method, device], [chart, table, status], inputs_kwargs={**setup, **options},
              concurrency_limit=1, concurrency_id="dryrun", api_visibility="private")
