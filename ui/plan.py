"""The Plan tab: what-if memory of one step for several methods, updated as the inputs change.

Handlers are plain functions over the estimator: `plan_memory` (figures and tables for a model,
method configs and a setup) and `estimate_memory` (the named API endpoint `estimate`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from estimator.config import (
    METHODS,
    LoRAConfig,
    MethodConfig,
    TrainSetup,
    check_json_numbers,
    method_config,
    shown,
)
from estimator.estimate import Estimate, estimate_spec
from estimator.gpus import find_gpu, fit_table, gpu_catalog, gpus_needed, max_batch_size, per_gpu_bytes
from estimator.loss import DEFAULT_CHUNK_TOKENS
from estimator.spec import MAX_CONFIG_BYTES, ModelSpec, load_spec, preset_table

from .charts import GiB, breakdown_figure, empty_figure, fmt_bytes, sweep_figure
from .widgets import METHOD_LABELS, configs_and_setup, method_options_block, setup_widgets, show_selected

SOURCES = ("preset", "hub id or local path", "uploaded config.json")
SWEEPS = ("batch size", "sequence length", "rank", "GPUs", "loss chunk tokens")
FULL_LOSS = " · full loss"  # the key suffix of a method's full-loss line in the loss-chunk sweep
PACKED, PADDED = " · packed", " · padded"  # packed or padded batches: the other drawn beside
ADAPTERS_ONLY = " · adapters only"  # LoRA/QLoRA with modules_to_save: the same method without them, beside
NO_GPU = "none"
DEVICES = ("cuda", "cpu")
SUMMARY_COLUMNS = ("method", "trainable", "peak", "phase", "load", "with overhead", "fits", "smallest GPU")


def resolve_model(source: str, preset: str, hub_id: str, upload: str | None) -> str:
    """The model the chosen source names: a preset, a hub id or path, or an uploaded config.json."""
    if source == SOURCES[2]:
        if not upload:
            raise ValueError("no config.json uploaded; upload one, or choose a preset")
        path = Path(upload)
        if path.suffix.lower() != ".json":
            raise ValueError(f"upload {path.name!r} is not a .json file; upload the model's config.json")
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"upload {path.name!r} is {size / 2**20:.1f} MB; a config.json is at most 1 MB — "
                             "upload the model's config.json, not its weights")
        return str(path)
    if source == SOURCES[1]:
        if not (hub_id or "").strip():
            raise ValueError("the hub id or local path is empty; type a hub id like Qwen/Qwen2.5-0.5B, a model "
                             "folder or a config.json path, then press Enter")
        return hub_id.strip()
    return preset


def upload_name(upload: str) -> str:
    """How the page names an uploaded config: by its original file name (Gradio keeps it as the
    cached file's name), never by the server's temporary folder."""
    return f"uploaded {Path(upload).name}"


def hide_upload_path(message: str, upload: str) -> str:
    """A message about an uploaded file with the server's temporary path (and folder) replaced by
    the upload's own name."""
    name = upload_name(upload)
    path = Path(upload)
    for text, by in ((f"config {str(path)!r}", f"the {name}"), (repr(str(path)), repr(name)), (str(path), name),
                     (repr(path.parent.name), repr(name))):
        message = message.replace(text, by)
    return message


def count_text(n: int) -> str:
    """Parameters as the page writes them: "6.738 B" from a billion on, "58.0 M" below."""
    return f"{n / 1e9:,.3f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def describe_model(spec: ModelSpec) -> str:
    kv = f", {spec.num_kv_heads} KV heads" if spec.num_kv_heads != spec.num_heads else ""
    return (f"**{spec.name}** ({spec.model_type}): {count_text(spec.params_total)} parameters, "
            f"{spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_heads} heads{kv}, "
            f"vocabulary {spec.vocab_size:,}")


def sweep_points(axis: str, spec: ModelSpec) -> list[int]:
    if axis == "batch size":
        return [2**i for i in range(10)]
    if axis == "sequence length":
        top = min(spec.max_position or 131072, 131072)
        return [2**i for i in range(6, 18) if 2**i <= top]
    if axis == "GPUs":
        return [2**i for i in range(11)]
    if axis == "loss chunk tokens":
        return [2**i for i in range(4, 14)]
    return [2**i for i in range(13) if 2**i <= spec.hidden_size]


def with_value(axis: str, method: MethodConfig, setup: TrainSetup, x: int) -> tuple[MethodConfig, TrainSetup]:
    """The point `x` of a sweep: batch sizes are per GPU, and more GPUs keep each GPU's batch."""
    if axis == "batch size":
        return method, replace(setup, batch_size=x * setup.gpus)
    if axis == "sequence length":
        return method, replace(setup, seq_len=x)
    if axis == "GPUs":  # one GPU shards nothing
        return method, replace(setup, gpus=x, batch_size=setup.per_gpu_batch * x,
                               shard=setup.shard if x > 1 else "none", cpu_offload=setup.cpu_offload and x > 1)
    if axis == "loss chunk tokens":  # the chunked loss at every point (its full-loss line is drawn beside)
        return method, replace(setup, loss="chunked", loss_chunk_tokens=x)
    if hasattr(method, "rank"):
        return replace(method, rank=x), setup
    return method, setup  # full training has no rank: a flat line


def needed_bytes(spec: ModelSpec, cfg: MethodConfig, setup: TrainSetup) -> int | None:
    """Memory a GPU needs (peak + overhead); None where the setting is invalid (e.g. a rank above a
    layer's dimension, a family that cannot pack)."""
    try:
        return estimate_spec(spec, cfg, setup).total_bytes
    except ValueError:
        return None


def adapters_only(cfg: MethodConfig) -> MethodConfig | None:
    """LoRA/QLoRA training modules in full (modules_to_save): the same method without them; else None."""
    if isinstance(cfg, LoRAConfig) and cfg.modules_to_save:
        return replace(cfg, modules_to_save="")
    return None


def sweep(spec: ModelSpec, configs: list[MethodConfig], setup: TrainSetup, axis: str) -> tuple[list, dict]:
    """Memory needed on a GPU (peak + overhead) at each point; None where the setting is invalid.

    Beside each method's line, what its lever costs: sweeping the loss's chunk, its full loss (a flat
    line, key "<method> · full loss"); with packed or padded batches, the other kind ("· padded",
    "· packed"); LoRA/QLoRA with modules_to_save, the adapters alone ("· adapters only")."""
    xs = sweep_points(axis, spec)
    series = {}
    for cfg in configs:
        series[cfg.method] = [needed_bytes(spec, *with_value(axis, cfg, setup, x)) for x in xs]
        if axis == "loss chunk tokens":
            series[cfg.method + FULL_LOSS] = [needed_bytes(spec, cfg, replace(setup, loss="full"))] * len(xs)
        if setup.packed or setup.padded:  # what-if: the same sweep with the other kind of batch
            other = replace(setup, packed=not setup.packed, padded=setup.packed)
            series[cfg.method + (PACKED if other.packed else PADDED)] = [
                needed_bytes(spec, *with_value(axis, cfg, other, x)) for x in xs]
        if bare := adapters_only(cfg):  # what-if: the embeddings / lm_head left frozen
            series[cfg.method + ADAPTERS_ONLY] = [needed_bytes(spec, *with_value(axis, bare, setup, x)) for x in xs]
    return xs, series


def sweep_labels() -> dict[str, str]:
    """The legend's name of each sweep line: the method, and the lines drawn beside it (sweep)."""
    beside = {FULL_LOSS: "full loss", PACKED: "packed", PADDED: "padded", ADAPTERS_ONLY: "adapters only"}
    return {**METHOD_LABELS, **{m + key: f"{label}, {name}" for key, name in beside.items()
                                for m, label in METHOD_LABELS.items()}}


def saved_modules_note(spec: ModelSpec, cfg: MethodConfig, setup: TrainSetup, est: Estimate) -> str | None:
    """What training modules_to_save in full costs at this point: the estimate beside the adapters alone."""
    bare = adapters_only(cfg)
    without = needed_bytes(spec, bare, setup) if bare else None
    if without is None:
        return None
    return (f"training {cfg.modules_to_save} in full adds {fmt_bytes(est.total_bytes - without)} "
            f"({fmt_bytes(without)} with adapters only → {fmt_bytes(est.total_bytes)}, peak + overhead)")


def fmt_count(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.2f} M"


def summary_table(estimates: dict) -> pd.DataFrame:
    """Per method: the step's peak, the load's (building and preparing the model), what a GPU needs
    (the larger, plus the overhead) and the GPUs that hold it."""
    rows = []
    for label, est in estimates.items():
        fits = [r for r in fit_table(est) if r["fits"]]
        smallest = min(fits, key=lambda r: r["memory_gib"])["gpu"] if fits else "none"
        rows.append(dict(zip(SUMMARY_COLUMNS, (
            METHOD_LABELS.get(label, label), fmt_count(est.params_trainable), fmt_bytes(est.peak_bytes), est.phase,
            fmt_bytes(est.load_bytes), fmt_bytes(est.total_bytes), f"{len(fits)} of {len(gpu_catalog())} GPUs",
            smallest))))
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def gpu_table(spec: ModelSpec, configs: list[MethodConfig], setup: TrainSetup) -> pd.DataFrame:
    """Each GPU: does the step fit (✓/✗), the largest batch per GPU that fits at this sequence
    length and GPU count, and, when sharded, how many of that GPU each method needs."""
    rows = []
    needs = {cfg.method: per_gpu_bytes(spec, cfg, setup) for cfg in configs}
    for gpu in sorted(gpu_catalog(), key=lambda g: g.memory_mib):
        row = {"GPU": gpu.name, "memory": f"{gpu.memory_bytes / GiB:.0f} GiB"}
        for cfg in configs:
            largest = max_batch_size(spec, cfg, setup, gpu, upper=4096)
            mark = "✓" if largest is not None and largest >= setup.per_gpu_batch else "✗"
            cell = f"{mark} ≤ {largest}" if largest else "✗"
            if setup.shard != "none":
                needed = gpus_needed(spec, cfg, setup, gpu, need=needs[cfg.method])
                cell += f" · needs {needed}" if needed else " · no count"
            row[METHOD_LABELS[cfg.method]] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def plan_memory(model: str, configs: list[MethodConfig], setup: TrainSetup, axis: str = "batch size",
                gpu_name: str | None = None, name: str | None = None) -> dict:
    """Everything the Plan tab shows. ValueError if the model cannot be loaded or no method can be estimated.

    `name`: what the page calls the model (an upload's own name), if not the one it was loaded by."""
    spec = load_spec(model)
    if name:
        spec = replace(spec, name=name)
    gpu = find_gpu(gpu_name) if gpu_name and gpu_name != NO_GPU else None
    estimates, errors = {}, {}
    for cfg in configs:
        try:
            estimates[cfg.method] = estimate_spec(spec, cfg, setup)
        except ValueError as err:
            errors[cfg.method] = str(err)
    if not estimates:
        raise ValueError("; ".join(f"{METHOD_LABELS[m]}: {e}" for m, e in errors.items()))
    for m, est in estimates.items():  # a number no chart or table could show: refuse it with the fix
        check_json_numbers({"total_bytes": est.total_bytes, **est.to_dict()}, f"the {METHOD_LABELS[m]} estimate")
    ok = [cfg for cfg in configs if cfg.method in estimates]
    xs, series = sweep(spec, ok, setup, axis)
    notes = [describe_model(spec)]
    notes += [f"- {METHOD_LABELS[m]}: {n}" for m, est in estimates.items() for n in est.notes]
    notes += [f"- {METHOD_LABELS[cfg.method]}: {n}" for cfg in ok
              if (n := saved_modules_note(spec, cfg, setup, estimates[cfg.method]))]
    notes += [f"- **{METHOD_LABELS[m]} not estimated**: {e}" for m, e in errors.items()]
    return {"breakdown": breakdown_figure({m: e.to_dict() for m, e in estimates.items()}, gpu, METHOD_LABELS),
            "summary": summary_table(estimates), "gpus": gpu_table(spec, ok, setup),
            "sweep": sweep_figure(xs, series, axis, gpu, sweep_labels()), "notes": "\n".join(notes), "errors": errors}


def cleared_plan(axis: str, notes: str, why: str) -> tuple:
    """The page's outputs with no estimate: empty charts saying `why`, empty tables, `notes` — so
    nothing of a previous model stays on screen unlabeled."""
    return (empty_figure("Peak memory of one training step, by category", why),
            pd.DataFrame(columns=list(SUMMARY_COLUMNS)), pd.DataFrame(columns=["GPU", "memory"]),
            empty_figure(f"Memory against {axis}", why), notes)


def update_plan(source: str, preset: str, hub_id: str, upload: str | None, methods: list[str], sweep_axis: str,
                gpu: str, **values) -> tuple:
    """Gradio handler: widget values -> configs -> plan_memory; problems become messages in the page.

    On a problem the charts and tables are cleared and the notes hold the message: the page never
    shows one model's numbers under another's name, or without a name."""
    waiting = {SOURCES[1]: not (hub_id or "").strip(), SOURCES[2]: not upload}
    if waiting.get(source):  # just switched to a source with nothing in it yet
        hint = "Type a hub id or a local path, then press Enter." if source == SOURCES[1] else "Upload a config.json."
        return cleared_plan(sweep_axis, hint, hint)
    uploaded = source == SOURCES[2]
    try:
        configs, setup = configs_and_setup(methods, values)
        model = resolve_model(source, preset, hub_id, upload)
        result = plan_memory(model, configs, setup, sweep_axis, gpu, name=upload_name(upload) if uploaded else None)
    except ValueError as err:
        message = " ".join(str(err).split())
        if uploaded:
            message = hide_upload_path(message, upload)
        gr.Warning(message, title="Cannot estimate")
        return cleared_plan(sweep_axis, f"**Cannot estimate**: {message}", "no estimate: see the message above")
    for method, message in result["errors"].items():
        gr.Warning(f"{METHOD_LABELS[method]}: {message}", title="Not estimated")
    return result["breakdown"], result["summary"], result["gpus"], result["sweep"], result["notes"]


def api_problems(model: Any, method: Any, options: Any, device: Any) -> list[str]:
    """What is wrong with the API's top-level arguments, before any of them is used."""
    problems = []
    if not isinstance(model, str):
        problems.append(f"model={shown(model)} must be a string: a preset (e.g. llama-7b), a hub id or a "
                        f"config.json path")
    if not isinstance(method, str) or method not in METHODS:
        problems.append(f"method={shown(method)} must be one of {', '.join(METHODS)}")
    if options is not None and not isinstance(options, dict):
        problems.append(f"options={shown(options)} must be an object of option names and values, "
                        f'e.g. {{"rank": 64}}, or null')
    elif options:
        keys = [k for k in options if not isinstance(k, str)]
        if keys:
            problems.append(f"options has key {shown(keys[0])}; option names are strings such as \"rank\"")
        if "method" in options:
            problems.append(f"options must not hold method (got {shown(options['method'])}); the method is its "
                            f"own argument: method=...")
    if not isinstance(device, str) or device not in DEVICES:
        problems.append(f"device={shown(device)} must be cuda or cpu")
    return problems


def estimate_memory(model: str = "llama-7b", method: str = "lora", options: dict | None = None,
                    batch_size: int = 1, seq_len: int = 256, grad_accum: int = 1, dtype: str = "bf16",
                    autocast: bool = False, grad_checkpointing: bool = False, attn_implementation: str = "sdpa",
                    device: str = "cuda", gpus: int = 1, shard: str = "none", loss: str = "full",
                    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS, packed: bool = False,
                    cpu_offload: bool = False) -> dict:
    """Predict the memory of one training step: the estimate's JSON object (`Estimate.to_dict`) plus `total_bytes` and `gpus`.

    model: a preset (llama-7b, ...), a hub id or a config.json path. method: full, lora, qlora,
    galore or qgalore. options: that method's dataclass fields, e.g. {"rank": 64, "targets": "all-linear"}.
    gpus, shard: data parallelism (shard: none, optimizer, gradients or full); the estimate is per GPU.
    cpu_offload: with shard gradients or full, FSDP2's shards in host memory (the result's "host").
    loss: full or chunked (loss_chunk_tokens tokens at a time: no b·s·V logits). packed: documents
    packed into full rows, attention kept inside each (position ids restarting per document).
    Every argument is checked (types included) and a problem is one message naming the argument and
    the fix; the result holds only integers within 64 bits, finite numbers and strings.
    """
    try:
        problems = api_problems(model, method, options, device)
        if problems:
            raise ValueError("; ".join(problems))
        cfg = method_config(method, **(options or {}))
        setup = TrainSetup(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, dtype=dtype,
                           autocast=autocast, grad_checkpointing=grad_checkpointing,
                           attn_implementation=attn_implementation, gpus=gpus, shard=shard, loss=loss,
                           loss_chunk_tokens=loss_chunk_tokens, packed=packed, cpu_offload=cpu_offload)
        est = estimate_spec(load_spec(model), cfg, setup, device=device)
        result = {**est.to_dict(), "total_bytes": est.total_bytes,
                  "gpus": fit_table(est) if device == "cuda" else []}
        check_json_numbers(result)
    except ValueError as err:
        raise gr.Error(" ".join(str(err).split()), title="Cannot estimate") from None
    return result


def warm_up(model: str = "llama-7b") -> None:
    """Load what the first estimates need — transformers' model classes, the default preset built on
    the meta device — by estimating it once per method (the app does it while it starts)."""
    for method in METHODS:
        estimate_memory(model, method)


def create_plan_tab(demo: gr.Blocks) -> None:
    """Layout and events of the Plan tab (call inside a gr.Tab of `demo`)."""
    presets = [(f"{name} — {row['description']}", name) for name, row in preset_table().items()]
    gpus = [NO_GPU] + [g.name for g in gpu_catalog()]
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            source = gr.Radio(list(SOURCES), value=SOURCES[0], label="model from")
            preset = gr.Dropdown(presets, value="llama-7b", label="preset")
            hub_id = gr.Textbox(label=SOURCES[1], placeholder="Qwen/Qwen2.5-0.5B or /path/to/model", visible=False,
                                info="a hub id, a model folder or a config.json path; press Enter to estimate "
                                     "(offline, only cached hub configs load)")
            upload = gr.File(label="config.json (JSON, at most 1 MB)", file_types=[".json"], visible=False)
            methods = gr.CheckboxGroup([(METHOD_LABELS[m], m) for m in METHOD_LABELS], value=list(METHOD_LABELS),
                                       label="methods to compare")
            setup = setup_widgets(batch_size=1, seq_len=256, prefix="plan")
            accordions, options = method_options_block(selected=tuple(METHOD_LABELS), prefix="plan")
        with gr.Column(scale=5):
            notes = gr.Markdown(elem_id="plan-notes")
            breakdown = gr.Plot(show_label=False, label="peak by category", elem_id="plan-breakdown")
            gpu = gr.Dropdown(gpus, value="RTX 4090", label="draw a GPU's memory on the charts")
            summary = gr.DataFrame(label="peak per method", elem_id="plan-summary", wrap=False)
            with gr.Row():
                sweep_axis = gr.Radio(list(SWEEPS), value=SWEEPS[0], label="sweep memory against")
            sweep_plot = gr.Plot(show_label=False, label="sweep", elem_id="plan-sweep")
            gpus_table = gr.DataFrame(label="largest batch per GPU that fits each GPU at this sequence length "
                                            "(✓: the chosen batch fits; ✗ alone: not even batch 1; sharded: "
                                            "how many of that GPU the method needs at this batch per GPU)",
                                      elem_id="plan-gpus", wrap=False)

    def show_source(choice: str):
        return gr.Dropdown(visible=choice == SOURCES[0]), gr.Textbox(visible=choice == SOURCES[1]), \
            gr.File(visible=choice == SOURCES[2])

    source.change(show_source, source, [preset, hub_id, upload], api_visibility="private", queue=False)
    methods.change(show_selected(accordions), methods, list(accordions.values()), api_visibility="private",
                   queue=False)
    inputs = [source, preset, hub_id, upload, methods, sweep_axis, gpu]
    widgets = {**setup, **options}
    triggers = [c.change for c in [source, preset, upload, methods, sweep_axis, gpu, *widgets.values()]]
    gr.on([*triggers, hub_id.submit, hub_id.blur, demo.load], update_plan, inputs=inputs, inputs_kwargs=widgets,
          outputs=[breakdown, summary, gpus_table, sweep_plot, notes], trigger_mode="always_last",
          concurrency_limit=None, show_progress="hidden", api_visibility="private")
    gr.api(estimate_memory, api_name="estimate", concurrency_limit=None)
