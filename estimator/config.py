"""The training setup and one dataclass per method, shared by `estimator/` and `lowrank/`.

A prediction and a run are built from the same objects, so they always describe the same thing.
Every dataclass validates itself on construction: all problems are collected, then one
`ValueError` names each field, its value and the fix.

    setup = TrainSetup(batch_size=4, seq_len=512, dtype="bf16")
    method = GaLoreConfig(rank=128, update_proj_gap=200, scale=0.25, optimizer="adamw8bit", layerwise=True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .constants import DTYPE_BYTES

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")
LOWRANK_OPTIMIZERS = ("adamw", "adamw8bit")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# Shorthands for the linear layers a method acts on; anything else is a comma-separated list
# of module names (the last part of the module path, e.g. "q_proj,v_proj").
TARGET_SHORTHANDS = ("attention", "mlp", "all-linear")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")
QUANT_TYPES = ("nf4", "fp4")


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(problems: list[str], name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(problems, value in choices, f"{name}={value!r} is not one of {', '.join(choices)}; pick one of those")


def _positive_int(problems: list[str], name: str, value: Any) -> None:
    _check(problems, _is_int(value) and value > 0, f"{name}={value!r} must be a whole number ≥ 1")


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else f"{what}: " + "; ".join(problems))


def parse_targets(targets: str) -> tuple[str, ...]:
    """`"attention"`, `"mlp"`, `"all-linear"` stay as one shorthand; a list splits on commas."""
    if targets in TARGET_SHORTHANDS:
        return (targets,)
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def _check_targets(problems: list[str], targets: Any) -> None:
    ok = isinstance(targets, str) and bool(parse_targets(targets))
    _check(problems, ok, f"targets={targets!r} must be attention, mlp, all-linear or module names like q_proj,v_proj")


@dataclass(frozen=True)
class TrainSetup:
    """What every method shares: the batch, the precision and the activation-saving strategy.

    dtype: how weights are stored and computed in ("pure" bf16 when bf16).
    autocast: keep weights in `dtype` (fp32) but run matmuls in bf16 under `torch.autocast` —
        mixed precision, the fp32 weights being the master copy.
    padded: micro-batches carry an attention mask (padded prompt/response data), so attention
        takes the masked path instead of the causal fast path (the trainer sets it for .jsonl).
    """

    batch_size: int = 1
    seq_len: int = 256
    grad_accum: int = 1
    dtype: str = "bf16"
    autocast: bool = False
    grad_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    padded: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        _positive_int(problems, "batch_size", self.batch_size)
        _positive_int(problems, "seq_len", self.seq_len)
        _positive_int(problems, "grad_accum", self.grad_accum)
        _choice(problems, "dtype", self.dtype, tuple(DTYPE_BYTES))
        _choice(problems, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check(problems, isinstance(self.autocast, bool), f"autocast={self.autocast!r} must be true or false")
        _check(problems, self.autocast is not True or self.dtype == "fp32",
               f"autocast=True needs dtype='fp32' (mixed precision keeps fp32 master weights), got dtype={self.dtype!r}")
        _check(problems, isinstance(self.grad_checkpointing, bool),
               f"grad_checkpointing={self.grad_checkpointing!r} must be true or false")
        _check(problems, isinstance(self.padded, bool), f"padded={self.padded!r} must be true or false")
        _raise(problems, "invalid training setup")

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch."""
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class MethodConfig:
    """Base of the method dataclasses; `method` is the name used on the command line."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        self.validate(problems)
        _raise(problems, f"invalid {self.method} options")

    def validate(self, problems: list[str]) -> None:  # overridden by each method
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Full training: every weight trainable, one of four optimizers.

    adamw keeps two moments in the weight dtype; adamw8bit two 8-bit moments in blocks of 256
    (bitsandbytes); adafactor factored second moments (no first moment); sgd one momentum buffer.
    """

    method: ClassVar[str] = "full"
    optimizer: str = "adamw"

    def validate(self, problems: list[str]) -> None:
        _choice(problems, "optimizer", self.optimizer, OPTIMIZERS)


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA (arXiv 2106.09685): W stays frozen, y = W x + (alpha / rank) · B A x.

    targets: "attention" (q,k,v,o), "mlp", "all-linear", or module names like "q_proj,v_proj".
    use_rslora: scale by alpha / sqrt(rank) instead (rsLoRA, arXiv 2312.03732).
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    use_rslora: bool = False
    optimizer: str = "adamw"

    def validate(self, problems: list[str]) -> None:
        _positive_int(problems, "rank", self.rank)
        _check(problems, isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
               and self.alpha > 0, f"alpha={self.alpha!r} must be a number > 0")
        _check(problems, isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
               f"dropout={self.dropout!r} must be in [0, 1)")
        _check_targets(problems, self.targets)
        _choice(problems, "optimizer", self.optimizer, OPTIMIZERS)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """QLoRA (arXiv 2305.14314): LoRA over base weights stored in 4-bit NF4 (or FP4) blocks of 64.

    double_quant quantizes the block constants again (fp32 absmax → 8 bits in blocks of 256).
    compute_dtype is the dtype the 4-bit weights are dequantized to for each matmul.
    """

    method: ClassVar[str] = "qlora"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        _choice(problems, "quant_type", self.quant_type, QUANT_TYPES)
        _choice(problems, "compute_dtype", self.compute_dtype, tuple(DTYPE_BYTES))


@dataclass(frozen=True)
class GaLoreConfig(MethodConfig):
    """GaLore (arXiv 2403.03507): full-rank weights, Adam on gradients projected to rank r.

    The projection comes from the SVD of the gradient and is refreshed every update_proj_gap
    steps; the low-rank update is projected back and multiplied by scale. targets picks the
    linear layers inside the decoder blocks that get projected (others use plain AdamW).
    layerwise: update each weight in its post-accumulate-grad hook, so full gradients never
    coexist. stagger: spread the subspace refreshes of the layers over the gap.
    """

    method: ClassVar[str] = "galore"
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    optimizer: str = "adamw"
    layerwise: bool = False
    svd: str = "randomized"
    stagger: bool = False
    targets: str = "all-linear"

    def validate(self, problems: list[str]) -> None:
        _positive_int(problems, "rank", self.rank)
        _positive_int(problems, "update_proj_gap", self.update_proj_gap)
        _check(problems, isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool)
               and self.scale > 0, f"scale={self.scale!r} must be a number > 0")
        _choice(problems, "proj_type", self.proj_type, PROJ_TYPES)
        _choice(problems, "optimizer", self.optimizer, LOWRANK_OPTIMIZERS)
        _choice(problems, "svd", self.svd, SVD_METHODS)
        _check(problems, isinstance(self.layerwise, bool), f"layerwise={self.layerwise!r} must be true or false")
        _check_targets(problems, self.targets)


@dataclass(frozen=True)
class QGaLoreConfig(GaLoreConfig):
    """Q-GaLore (arXiv 2407.08296): GaLore with INT8 weights, INT4 projections, lazy refreshes.

    Targeted linear weights are stored in INT8 (asymmetric, groups of weight_group_size) and
    updated with stochastic rounding; projection matrices in proj_bits (4: two codes per byte)
    with groups of proj_group_size. adaptive: after each SVD compare the new and old leading
    singular vectors; when the last queue_size similarities average ≥ cos_threshold, that
    layer's gap doubles.
    """

    method: ClassVar[str] = "qgalore"
    optimizer: str = "adamw8bit"
    layerwise: bool = True
    weight_group_size: int = 256
    proj_bits: int = 4
    proj_group_size: int = 256
    adaptive: bool = True
    cos_threshold: float = 0.4
    queue_size: int = 5

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        _positive_int(problems, "weight_group_size", self.weight_group_size)
        _check(problems, self.proj_bits in (4, 8, 16), f"proj_bits={self.proj_bits!r} must be 4, 8 or 16")
        _positive_int(problems, "proj_group_size", self.proj_group_size)
        _check(problems, isinstance(self.cos_threshold, (int, float)) and 0 <= self.cos_threshold <= 1,
               f"cos_threshold={self.cos_threshold!r} must be in [0, 1]")
        _positive_int(problems, "queue_size", self.queue_size)


METHODS: dict[str, type[MethodConfig]] = {
    cls.method: cls for cls in (FullConfig, LoRAConfig, QLoRAConfig, GaLoreConfig, QGaLoreConfig)
}


def method_config(method: str, **options: Any) -> MethodConfig:
    """Build the dataclass of `method` from keyword options; unknown options are an error."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}; pick one of those")
    cls = METHODS[method]
    known = set(cls.option_names())
    extra = [name for name in options if name not in known]
    if extra:
        users = {name: [m for m, c in METHODS.items() if name in c.option_names()] for name in extra}
        parts = [f"{name} does not apply to method {method}"
                 + (f" (it is an option of {', '.join(users[name])})" if users[name] else "") for name in extra]
        raise ValueError("; ".join(parts))
    return cls(**options)
