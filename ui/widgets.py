"""Bounded widgets for the training setup and every method's options, and their values back as dataclasses.

Each option of each method dataclass (estimator/config.py) gets one widget, keyed
"<method>__<field>" and initialized with the dataclass default; `method_configs` turns the
values back into the dataclasses, which validate them. The Plan, Train and Dry run tabs each
build their own set, so a what-if in one tab never moves another.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import gradio as gr

from estimator.config import (
    ATTN_IMPLEMENTATIONS,
    DTYPE_BYTES,
    LOWRANK_OPTIMIZERS,
    METHODS,
    OPTIMIZERS,
    PROJ_TYPES,
    QLORA_RECIPES,
    QUANT_TYPES,
    SVD_METHODS,
    TARGET_SHORTHANDS,
    GaLoreConfig,
    MethodConfig,
    TrainSetup,
    method_config,
)
from estimator.loss import DEFAULT_CHUNK_TOKENS, LOSSES, MAX_CHUNK_TOKENS
from estimator.options import METHOD_OPTIONS, SETUP_OPTIONS

METHOD_LABELS = {"full": "Full training", "lora": "LoRA", "qlora": "QLoRA", "galore": "GaLore",
                 "qgalore": "Q-GaLore"}
GROUP_SIZES = [32, 64, 128, 256, 512, 1024, 2048]


def _slider(low: float, high: float, step: float):
    return lambda **kw: gr.Slider(low, high, step=step, precision=0 if float(step).is_integer() else None, **kw)


def _number(low: float, high: float, step: float = 1):
    """A number input (a slider over thousands of values cannot be aimed, and its ends get cut off)."""
    return lambda **kw: gr.Number(minimum=low, maximum=high, step=step,
                                  precision=0 if float(step).is_integer() else None, **kw)


def _dropdown(choices, custom: bool = False):
    return lambda **kw: gr.Dropdown(list(choices), allow_custom_value=custom, **kw)


# One widget kind per dataclass field; every number has bounds.
FIELD_WIDGETS = {
    "rank": _number(1, 65536),
    "alpha": lambda **kw: gr.Number(minimum=0.01, maximum=4096, **kw),
    "dropout": _slider(0, 0.9, 0.05),
    "targets": _dropdown([*TARGET_SHORTHANDS, "q_proj,v_proj"], custom=True),
    "use_rslora": gr.Checkbox,
    "modules_to_save": _dropdown(["", "embed_tokens", "lm_head", "embed_tokens,lm_head"], custom=True),
    "optimizer": _dropdown(OPTIMIZERS),
    "quant_type": _dropdown(QUANT_TYPES),
    "double_quant": gr.Checkbox,
    "compute_dtype": _dropdown(["default", *DTYPE_BYTES]),
    "recipe": _dropdown(QLORA_RECIPES),
    "update_proj_gap": _number(1, 1_000_000),
    "scale": lambda **kw: gr.Number(minimum=0.01, maximum=10, step=0.05, **kw),
    "proj_type": _dropdown(PROJ_TYPES),
    "layerwise": gr.Checkbox,
    "svd": _dropdown(SVD_METHODS),
    "stagger": gr.Checkbox,
    "weight_group_size": _dropdown(GROUP_SIZES),
    "proj_bits": _dropdown([4, 8, 16]),
    "proj_group_size": _dropdown(GROUP_SIZES),
    "adaptive": gr.Checkbox,
    "cos_threshold": _slider(0, 1, 0.05),
    "queue_size": _slider(1, 50, 1),
}


# The page's name of each field (the command line's flag is in the help text under it).
FIELD_LABELS = {
    "rank": "rank",
    "alpha": "LoRA alpha",
    "dropout": "LoRA dropout",
    "targets": "target layers",
    "use_rslora": "rank-stabilized scaling (rsLoRA)",
    "modules_to_save": "also train in full (modules_to_save)",
    "optimizer": "optimizer",
    "quant_type": "4-bit data type",
    "double_quant": "double quantization",
    "compute_dtype": "compute dtype",
    "recipe": "recipe (ours, or peft: as people run it)",
    "update_proj_gap": "refresh gap (update_proj_gap)",
    "scale": "update scale (GaLore alpha)",
    "proj_type": "projection type",
    "layerwise": "layer-wise updates",
    "svd": "SVD method",
    "stagger": "stagger the refreshes",
    "weight_group_size": "INT8 weight group size",
    "proj_bits": "projection bits",
    "proj_group_size": "projection group size",
    "adaptive": "adaptive refresh gaps",
    "cos_threshold": "similarity threshold (cos_threshold)",
    "queue_size": "similarity queue size",
}


def option_label(name: str) -> str:
    """The page's label of a method option (a field of its dataclass)."""
    return FIELD_LABELS.get(name, name.replace("_", " "))


def option_help(method: str, name: str) -> str:
    """The command line's help for this field of this method (one text for CLI and app)."""
    return next((o.help for o in METHOD_OPTIONS if o.field == name and method in o.methods), "")


def option_flag(method: str, name: str) -> str:
    return next((o.flag.lstrip("-") for o in METHOD_OPTIONS if o.field == name and method in o.methods), name)


def method_option_widgets(method: str, defaults: dict[str, Any] | None = None,
                          prefix: str = "") -> dict[str, gr.components.Component]:
    """One bounded widget per option of `method`, keyed "<method>__<field>"; call inside a layout block.

    `prefix` names the widgets' HTML ids ("<prefix>-<method>-<field>") for browser tests."""
    cls = METHODS[method]
    widgets = {}
    for f in fields(cls):
        value = (defaults or {}).get(f.name, f.default)
        make = FIELD_WIDGETS[f.name]
        if f.name == "optimizer" and issubclass(cls, GaLoreConfig):
            make = _dropdown(LOWRANK_OPTIMIZERS)
        info = "; ".join(t for t in (option_help(method, f.name), f"--{option_flag(method, f.name)}") if t)
        widgets[f"{method}__{f.name}"] = make(label=option_label(f.name), value=value, info=info,
                                              elem_id=f"{prefix}-{method}-{f.name}" if prefix else None)
    return widgets


def method_options_block(methods: tuple[str, ...] = tuple(METHODS), selected: tuple[str, ...] = (),
                         defaults: dict[str, dict] | None = None, prefix: str = "") -> tuple[dict, dict]:
    """An accordion of option widgets per method (shown when the method is selected).

    Returns (accordions by method, widgets by "<method>__<field>")."""
    accordions, widgets = {}, {}
    for method in methods:
        with gr.Accordion(f"{METHOD_LABELS[method]} options", open=False, visible=method in selected,
                          elem_id=f"{prefix}-{method}-options" if prefix else None) as acc:
            widgets.update(method_option_widgets(method, (defaults or {}).get(method), prefix))
        accordions[method] = acc
    return accordions, widgets


def show_selected(accordions: dict) -> callable:
    """Handler: one accordion visibility update per method, for a CheckboxGroup's value."""

    def update(selected: list[str]) -> list:
        return [gr.Accordion(visible=method in (selected or [])) for method in accordions]

    return update


def _coerce(value: Any, default: Any) -> Any:
    """A widget value as the dataclass field's type (sliders and numbers give floats)."""
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    if isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    if isinstance(default, str) and isinstance(value, str):
        return value.strip()
    return value


def method_configs(methods: list[str], options: dict[str, Any]) -> list[MethodConfig]:
    """The dataclass of each chosen method from the widget values; ValueError names the field."""
    if not methods:
        raise ValueError("no method chosen; tick at least one of " + ", ".join(METHODS))
    configs = []
    for method in methods:
        cls = METHODS.get(method)
        if cls is None:
            raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
        values = {f.name: _coerce(options[f"{method}__{f.name}"], f.default)
                  for f in fields(cls) if f"{method}__{f.name}" in options}
        try:
            configs.append(method_config(method, **values))
        except ValueError as err:
            raise ValueError(f"{METHOD_LABELS[method]}: {err}") from None
    return configs


# ---------------------------------------------------------------------------- training setup

SETUP_HELP = {o.field: o.help for o in SETUP_OPTIONS}


SHARD_LABELS = {"none": "none: replicated (DDP)", "optimizer": "optimizer states (ZeRO-1)",
                "gradients": "+ gradients (FSDP2, ZeRO-2)", "full": "+ weights (FSDP2, ZeRO-3)"}


def setup_widgets(batch_size: int = 1, seq_len: int = 256, dtype: str = "bf16", dtypes=tuple(DTYPE_BYTES),
                  max_batch: int = 512, max_seq: int = 32768, prefix: str = "", max_gpus: int = 1024,
                  gpus_label: str = "GPUs (data parallel)") -> dict[str, gr.components.Component]:
    """Batch, sequence, accumulation, the loss (full or chunked, beside the batch), GPUs and sharding,
    precision, checkpointing and attention widgets (ids "<prefix>-<field>"); call inside a layout block."""
    widgets = {
        "batch_size": gr.Slider(1, max_batch, value=batch_size, step=1, precision=0, label="batch size",
                                info=SETUP_HELP["batch_size"]),
        "seq_len": gr.Slider(16, max_seq, value=seq_len, step=16, precision=0, label="sequence length",
                             info=SETUP_HELP["seq_len"]),
        "grad_accum": gr.Slider(1, 64, value=1, step=1, precision=0, label="gradient accumulation",
                                info=SETUP_HELP["grad_accum"]),
    }
    with gr.Row():  # the loss beside the batch: the chunked loss is a batch-size lever at large vocabularies
        widgets["loss"] = gr.Radio(list(LOSSES), value="full", label="loss", info=SETUP_HELP["loss"])
        widgets["loss_chunk_tokens"] = gr.Number(DEFAULT_CHUNK_TOKENS, minimum=1, maximum=MAX_CHUNK_TOKENS, step=1,
                                                 precision=0, label="tokens per loss chunk",
                                                 info="--loss-chunk-tokens (with the chunked loss)")
    with gr.Row():  # how rows are filled, beside the batch (the Plan tab's sweep draws padded rows beside)
        widgets["packed"] = gr.Checkbox(False, label="sequence packing (no padding)", info=SETUP_HELP["packed"])
    widgets |= {
        "gpus": gr.Number(1, minimum=1, maximum=max_gpus, step=1, precision=0, label=gpus_label,
                          info="the batch size is split across them; memory is per GPU"),
        "shard": gr.Dropdown([(label, name) for name, label in SHARD_LABELS.items()], value="none",
                             label="sharding across GPUs", info="what the GPUs split (with 2 or more)"),
        "cpu_offload": gr.Checkbox(False, label="CPU offload (FSDP2: with sharded gradients or weights)",
                                   info=SETUP_HELP["cpu_offload"]),
        "dtype": gr.Dropdown(list(dtypes), value=dtype, label="dtype", info=SETUP_HELP["dtype"]),
        "autocast": gr.Checkbox(False, label="autocast (fp32 weights, bf16 matmuls)"),
        "grad_checkpointing": gr.Checkbox(False, label="gradient checkpointing"),
        "attn_implementation": gr.Dropdown(list(ATTN_IMPLEMENTATIONS), value="sdpa", label="attention"),
    }
    if prefix:
        for name, widget in widgets.items():
            widget.elem_id = f"{prefix}-{name}"
    return widgets


def train_setup(batch_size: float, seq_len: float, grad_accum: float, dtype: str, autocast: bool,
                grad_checkpointing: bool, attn_implementation: str, gpus: float = 1,
                shard: str = "none", loss: str = "full", loss_chunk_tokens: float = DEFAULT_CHUNK_TOKENS,
                packed: bool = False, padded: bool = False, cpu_offload: bool = False) -> TrainSetup:
    """TrainSetup from the setup widgets' values (ValueError names the field)."""
    return TrainSetup(batch_size=_coerce(batch_size, 1), seq_len=_coerce(seq_len, 1),
                      grad_accum=_coerce(grad_accum, 1), dtype=dtype, autocast=bool(autocast),
                      grad_checkpointing=bool(grad_checkpointing), attn_implementation=attn_implementation,
                      gpus=_coerce(gpus, 1), shard=shard, loss=loss,
                      loss_chunk_tokens=_coerce(loss_chunk_tokens, DEFAULT_CHUNK_TOKENS), packed=bool(packed),
                      padded=bool(padded), cpu_offload=bool(cpu_offload))


def configs_and_setup(methods: list[str], values: dict[str, Any]) -> tuple[list[MethodConfig], TrainSetup]:
    """The chosen methods' dataclasses and the TrainSetup from a tab's widget values (keyword inputs)."""
    setup, options = split_setup(values)
    return method_configs(methods, options), setup


def split_setup(values: dict[str, Any]) -> tuple[TrainSetup, dict[str, Any]]:
    """(TrainSetup from the setup keys, the remaining values: method options)."""
    names = ("batch_size", "seq_len", "grad_accum", "dtype", "autocast", "grad_checkpointing", "attn_implementation",
             "gpus", "shard", "cpu_offload", "loss", "loss_chunk_tokens", "packed", "padded")
    setup = train_setup(**{n: values[n] for n in names if n in values})
    return setup, {k: v for k, v in values.items() if k not in names}
