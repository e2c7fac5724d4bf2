"""The option table: each command-line flag and the dataclass field it sets.

`python -m estimator`, `python -m lowrank.train` (through estimator/arguments.py), the app's
worker (which writes the flags of a run) and the app's widgets (their help texts) all read it,
so a prediction and a run always describe the same thing. lowrank/recipe.py adds the run's own
options (steps, lr, ...) as Options of the same kind. No argparse here: this is vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .config import (
    ATTN_IMPLEMENTATIONS,
    METHODS,
    OPTIMIZERS,
    PROJ_TYPES,
    QLORA_RECIPES,
    QUANT_TYPES,
    SHARD_STRATEGIES,
    SVD_METHODS,
    MethodConfig,
    TrainSetup,
)
from .constants import DTYPE_BYTES
from .loss import DEFAULT_CHUNK_TOKENS, LOSSES

LORA = ("lora", "qlora")
GALORE = ("galore", "qgalore")
ALL = tuple(METHODS)


@dataclass(frozen=True)
class Option:
    flag: str
    field: str
    type: Any
    help: str
    methods: tuple[str, ...] = ALL
    choices: tuple | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


METHOD_OPTIONS = (
    Option("--rank", "rank", int, "rank of LoRA factors or of GaLore's projection", LORA + GALORE),
    Option("--lora-alpha", "alpha", float, "LoRA alpha (scaling = alpha / rank)", LORA),
    Option("--lora-dropout", "dropout", float, "dropout on the LoRA input", LORA),
    Option("--lora-targets", "targets", str, "attention, mlp, all-linear, or names like q_proj,v_proj", LORA),
    Option("--rslora", "use_rslora", bool, "scale LoRA by alpha / sqrt(rank)", LORA),
    Option("--modules-to-save", "modules_to_save", str, "LoRA: train these in full beside the adapters, as peft's "
           "modules_to_save (a trainable copy each): embed_tokens, lm_head or embed_tokens,lm_head (also: "
           "embeddings, wte, embed_in, embed_out)", LORA),
    Option("--optimizer", "optimizer", str, "optimizer (GaLore: adamw or adamw8bit)", ALL, OPTIMIZERS),
    Option("--quant-type", "quant_type", str, "QLoRA 4-bit data type", ("qlora",), QUANT_TYPES),
    Option("--double-quant", "double_quant", bool, "QLoRA: quantize the quantization constants too", ("qlora",)),
    Option("--compute-dtype", "compute_dtype", str, "QLoRA: dtype the 4-bit weights are dequantized to (default: "
           "bf16; fp32 under --qlora-recipe peft, transformers' default)", ("qlora",), tuple(DTYPE_BYTES)),
    Option("--qlora-recipe", "recipe", str, "QLoRA: ours, or peft: QLoRA as people run it (prepare_model_for_kbit_"
           "training's fp32 norms, embeddings and lm_head, reentrant checkpointing, fp32 adapters, paged AdamW)",
           ("qlora",), QLORA_RECIPES),
    Option("--update-proj-gap", "update_proj_gap", int, "GaLore: steps between subspace refreshes (T)", GALORE),
    Option("--galore-scale", "scale", float, "GaLore: scale of the projected-back update (alpha)", GALORE),
    Option("--proj-type", "proj_type", str, "GaLore projection type", GALORE, PROJ_TYPES),
    Option("--layerwise", "layerwise", bool, "GaLore: update each weight during backward", GALORE),
    Option("--svd", "svd", str, "GaLore: how the subspace is computed", GALORE, SVD_METHODS),
    Option("--stagger", "stagger", bool, "GaLore: spread the layers' subspace refreshes over the gap", GALORE),
    Option("--galore-targets", "targets", str, "GaLore: attention, mlp, all-linear, or layer names", GALORE),
    Option("--weight-group-size", "weight_group_size", int, "Q-GaLore: INT8 weight group size", ("qgalore",)),
    Option("--proj-bits", "proj_bits", int, "Q-GaLore: bits of the projection matrices", ("qgalore",), (4, 8, 16)),
    Option("--proj-group-size", "proj_group_size", int, "Q-GaLore: projection quantization group size",
           ("qgalore",)),
    Option("--adaptive", "adaptive", bool, "Q-GaLore: lazy layer-adaptive subspace refreshes", ("qgalore",)),
    Option("--cos-threshold", "cos_threshold", float, "Q-GaLore: similarity above which a layer's gap doubles",
           ("qgalore",)),
    Option("--queue-size", "queue_size", int, "Q-GaLore: refreshes averaged before the gap doubles", ("qgalore",)),
)

SETUP_OPTIONS = (
    Option("--batch-size", "batch_size", int, "micro-batch size"),
    Option("--seq-len", "seq_len", int, "tokens per sequence"),
    Option("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    Option("--dtype", "dtype", str, "weight dtype", ALL, tuple(DTYPE_BYTES)),
    Option("--autocast", "autocast", bool, "mixed precision: fp32 weights, bf16 matmuls"),
    Option("--grad-checkpointing", "grad_checkpointing", bool, "recompute activations in backward"),
    Option("--attn", "attn_implementation", str, "attention implementation", ALL, ATTN_IMPLEMENTATIONS),
    Option("--padded", "padded", bool, "batches carry an attention mask (padded .jsonl data; the trainer sets it)"),
    Option("--packed", "packed", bool, "sequence packing: documents or records joined into full rows, no padding, "
           "position ids restarting per document so attention stays inside each (replaces --padded)"),
    Option("--gpus", "gpus", int, "data-parallel GPUs (ranks); --batch-size is split across them (training: "
           "torchrun's world size)"),
    Option("--shard", "shard", str, "what the GPUs split: none (DDP), optimizer (ZeRO-1), gradients (FSDP2 "
           "ZeRO-2), full (FSDP2 ZeRO-3)", ALL, SHARD_STRATEGIES),
    Option("--cpu-offload", "cpu_offload", bool, "with --shard gradients or full: FSDP2's CPUOffloadPolicy keeps "
           "each GPU's shards of the parameters, gradients and optimizer states in host memory (the optimizer "
           "steps on the CPU); the estimate reports that host memory beside the GPU peak"),
    Option("--loss", "loss", str, "full: transformers' cross-entropy over all logits at once; chunked: "
           "--loss-chunk-tokens tokens at a time, each chunk's logits recomputed in backward (no b·s·V logits)",
           ALL, LOSSES),
    Option("--loss-chunk-tokens", "loss_chunk_tokens", int, "tokens per chunk of --loss chunked (memory: "
           f"chunk × vocab × 6 bytes in bf16; default {DEFAULT_CHUNK_TOKENS})"),
)


def as_flags(message: str, method: str, extra: tuple[Option, ...] = ()) -> str:
    """A dataclass's message in command-line words: `batch_size=0 must …` → `--batch-size 0 must …`."""
    def flag(match: re.Match) -> str:
        for option in (*METHOD_OPTIONS, *SETUP_OPTIONS, *extra):
            if option.field == match.group(1) and method in option.methods:
                return f"{option.flag} "
        return match.group(0)

    return re.sub(r"\b([a-z_]+)=", flag, message)


def flags_for(method: MethodConfig, setup: TrainSetup) -> list[str]:
    """The command-line flags that rebuild `method` and `setup` (runs started by the app use them)."""
    out = ["--method", method.method]
    for option in METHOD_OPTIONS:
        if method.method in option.methods:
            out += _flag(option, getattr(method, option.field))
    for option in SETUP_OPTIONS:
        out += _flag(option, getattr(setup, option.field))
    return out


def option_flags(options: tuple[Option, ...], values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The flags that set `values` where they differ from `defaults` (None values stay unset)."""
    out = []
    for option in options:
        value = values[option.field]
        if value is not None and value != defaults.get(option.field):
            out += _flag(option, value)
    return out


def _flag(option: Option, value: Any) -> list[str]:
    if option.type is bool:
        return [option.flag if value else "--no-" + option.flag[2:]]
    return [option.flag, str(value)]
