"""The training setup and one dataclass per method, shared by `estimator/` and `lowrank/`.

A prediction and a run are built from the same objects, so they always describe the same thing.
Every dataclass validates itself on construction: all problems are collected, then one
`ValueError` names each field, its value and the fix.

    setup = TrainSetup(batch_size=4, seq_len=512, dtype="bf16")
    method = GaLoreConfig(rank=128, update_proj_gap=200, scale=0.25, optimizer="adamw8bit", layerwise=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .constants import DTYPE_BYTES
from .loss import DEFAULT_CHUNK_TOKENS, LOSSES, MAX_CHUNK_TOKENS

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")
LOWRANK_OPTIMIZERS = ("adamw", "adamw8bit")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# Shorthands for the linear layers a method acts on; anything else is a comma-separated list
# of module names (the last part of the module path, e.g. "q_proj,v_proj").
TARGET_SHORTHANDS = ("attention", "mlp", "all-linear")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")
QUANT_TYPES = ("nf4", "fp4")
QLORA_RECIPES = ("ours", "peft")  # lowrank/qlora.py; peft's prepare_model_for_kbit_training
PROJ_BITS = (4, 8, 16)
SHARD_STRATEGIES = ("none", "optimizer", "gradients", "full")  # DDP, ZeRO-1, FSDP2 ZeRO-2, FSDP2 ZeRO-3
# LoRA's modules_to_save, by role: the input embeddings (get_input_embeddings()) and the output
# projection (get_output_embeddings()). Each role's accepted spellings: ours, then the families' own names
# (GPT-2's wte, NeoX's embed_in / embed_out); a config keeps the canonical first one.
SAVE_ROLES = {"embed_tokens": ("embed_tokens", "embeddings", "wte", "embed_in"),
              "lm_head": ("lm_head", "embed_out")}
HEAD_TARGET = "lm_head"  # a LoRA target outside the decoder blocks: the output projection (any family's)


# Bounds beyond any GPU: they keep every byte count an estimate makes far below what a 64-bit
# integer (a JSON number) holds, and each names the fix when crossed.
MAX_BATCH_SIZE = 1 << 20  # sequences per micro-batch
MAX_SEQ_LEN = 1 << 24  # 16,777,216 tokens: beyond the longest context of any released model
MAX_GRAD_ACCUM = 1 << 20  # micro-batches per optimizer step
MAX_GPUS = 1 << 16  # data-parallel ranks
MAX_RANK = 1 << 16  # LoRA / GaLore rank (wider than any model's hidden size)
MAX_UPDATE_PROJ_GAP = 10**9  # steps between GaLore subspace refreshes
MAX_QUEUE_SIZE = 1000  # Q-GaLore: refreshes averaged before a layer's gap doubles
MAX_SCALE = 1e6  # LoRA alpha, GaLore scale: multipliers of an update, finite and sane
# Q-GaLore group sizes: a power of two (so whole groups tile lowrank.quant's work blocks of
# constants.QUANT_BLOCK elements exactly), from 16 (below it the fp16 scale and offset of each group
# outweigh the codes) to 65536 (Q-GaLore uses 256).
GROUP_SIZES = tuple(2**i for i in range(4, 17))
MAX_TARGETS_CHARS = 1000
MAX_SHOWN_CHARS = 60  # a value is quoted in a message up to this many characters
INT64_LIMIT = 1 << 63  # results hold integers in [-2^63, 2^63): what JSON clients read exactly or as int64


def shown(value: Any) -> str:
    """A value as a message quotes it: its repr, one line, cut to MAX_SHOWN_CHARS."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a list nested too deep
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 1] + "…"


def check_json_numbers(data: Any, what: str = "the estimate") -> None:
    """ValueError unless every number in `data` (dicts and lists, any depth) is a bool, an integer
    within 64 bits or a finite float: what a JSON encoder writes and any client reads back."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{path}.{key}" if path else str(key), value) for key, value in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{path}[{i}]", value) for i, value in enumerate(node))
        elif isinstance(node, bool) or node is None or isinstance(node, str) or isinstance(node, int) and -INT64_LIMIT <= node < INT64_LIMIT or isinstance(node, float) and math.isfinite(node) and abs(node) < INT64_LIMIT:
            continue
        elif isinstance(node, int):
            raise ValueError(f"{what} is beyond what 64 bits hold ({path} = about 2^{node.bit_length() - 1}): "
                             f"no GPU holds such a step; lower batch_size or seq_len")
        else:
            raise ValueError(f"{what} holds {path} = {shown(node)}, not a finite number; lower batch_size or "
                             f"seq_len")


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real, finite number: an int or a float, not a bool, not nan or ±inf."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or isinstance(value, float) and math.isfinite(value)


def _choice(problems: list[str], name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(problems, isinstance(value, str) and value in choices,
           f"{name}={shown(value)} is not one of {', '.join(choices)}; pick one of those")


def _positive_int(problems: list[str], name: str, value: Any, high: int | None = None) -> None:
    """A whole number from 1 to `high`: an int, not a bool, not a float."""
    top = float("inf") if high is None else high
    if _is_int(value) and 1 <= value <= top:
        return
    if _is_number(value) and value > top:
        problems.append(f"{name}={shown(value)} must be a whole number ≤ {high:,}; lower it")
    elif isinstance(value, float) and value.is_integer() and value >= 1:
        problems.append(f"{name}={shown(value)} must be a whole number written without a decimal point "
                        f"({int(value)}, not {shown(value)})")
    else:
        problems.append(f"{name}={shown(value)} must be a whole number ≥ 1")


def _flag(problems: list[str], name: str, value: Any) -> None:
    _check(problems, isinstance(value, bool), f"{name}={shown(value)} must be true or false")


def _number(problems: list[str], name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """A finite number (not a bool, nan or ±inf) that `ok` accepts; else "<name>=<value> must be <requirement>"."""
    _check(problems, _is_number(value) and ok(value), f"{name}={shown(value)} must be {requirement}")


def _group_size(problems: list[str], name: str, value: Any) -> None:
    _check(problems, _is_int(value) and value in GROUP_SIZES,
           f"{name}={shown(value)} must be a power of two from {GROUP_SIZES[0]} to {GROUP_SIZES[-1]:,} "
           f"(Q-GaLore uses 256)")


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else f"{what}: " + "; ".join(problems))


def parse_targets(targets: str) -> tuple[str, ...]:
    """`"attention"`, `"mlp"`, `"all-linear"` stay as one shorthand; a list splits on commas."""
    if targets in TARGET_SHORTHANDS:
        return (targets,)
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def parse_modules_to_save(value: str) -> tuple[str, ...]:
    """The canonical roles ("embed_tokens", "lm_head") a modules_to_save string names, in that order;
    ValueError naming the accepted spellings for a name that is none of them."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    roles = set()
    for name in names:
        role = next((r for r, spellings in SAVE_ROLES.items() if name in spellings), None)
        if role is None:
            accepted = ", ".join(s for spellings in SAVE_ROLES.values() for s in spellings)
            raise ValueError(f"modules_to_save={shown(value)}: {shown(name)} is not one of {accepted} (comma-separated)")
        roles.add(role)
    return tuple(r for r in SAVE_ROLES if r in roles)


def _check_targets(problems: list[str], targets: Any) -> None:
    ok = isinstance(targets, str) and len(targets) <= MAX_TARGETS_CHARS and bool(parse_targets(targets))
    _check(problems, ok, f"targets={shown(targets)} must be attention, mlp, all-linear or module names like "
                         f"q_proj,v_proj (at most {MAX_TARGETS_CHARS:,} characters)")


# A representative packed row for a dry run or a trace: documents of these shares of seq_len, cycled.
PACKED_DOCUMENTS = (0.6, 0.4)


def packed_positions(lengths: list[int], seq_len: int) -> list[int]:
    """The position_ids of one packed row holding documents of `lengths` tokens (cycled until the row
    is full), as lowrank/data.py `packed_rows` gives such a row: restarting at 0 for each document."""
    out: list[int] = []
    i = 0
    while len(out) < seq_len:
        out += range(min(lengths[i % len(lengths)], seq_len - len(out)))
        i += 1
    return out


def representative_packed_positions(seq_len: int) -> list[int]:
    """One packed row of documents of PACKED_DOCUMENTS shares of `seq_len` (two boundaries or more
    from 4 tokens up, so transformers finds it packed)."""
    return packed_positions([max(1, round(share * seq_len)) for share in PACKED_DOCUMENTS], seq_len)


@dataclass(frozen=True)
class TrainSetup:
    """What every method shares: the batch, the precision and the activation-saving strategy.

    dtype: how weights are stored and computed in ("pure" bf16 when bf16).
    autocast: keep weights in `dtype` (fp32) but run matmuls in bf16 under `torch.autocast` —
        mixed precision, the fp32 weights being the master copy.
    padded: micro-batches carry an attention mask (padded prompt/response data), so attention
        takes the masked path instead of the causal fast path (the trainer sets it for .jsonl).
    packed: documents (or records) are packed into full rows with no padding, position_ids
        restarting per document (lowrank/data.py `packed_rows`): attention stays inside each
        document through a block-diagonal mask built from the position ids (SDPA: a boolean
        (b, 1, s, s) one), RoPE's tables are per row. Replaces padding (padded must be False).
    gpus: data-parallel ranks (processes). batch_size is the whole micro-batch: each rank
        computes batch_size / gpus rows of it, so it must divide. Training takes it from torchrun.
    shard: what the ranks split (lowrank/distributed.py): none (DDP), optimizer (ZeRO-1),
        gradients (FSDP2, ZeRO-2) or full (FSDP2, ZeRO-3).
    cpu_offload: FSDP2's CPUOffloadPolicy (shard gradients or full only): each rank's sharded
        parameters, gradients and optimizer states live in host memory, the optimizer steps there;
        the GPU holds the gathered blocks, activations and the gradients before their reduce-scatter.
    loss: "full" (transformers' cross-entropy over every token's logits) or "chunked" (lowrank/loss.py:
        `loss_chunk_tokens` tokens at a time, each chunk's logits recomputed in backward).
    """

    batch_size: int = 1
    seq_len: int = 256
    grad_accum: int = 1
    dtype: str = "bf16"
    autocast: bool = False
    grad_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    padded: bool = False
    packed: bool = False
    gpus: int = 1
    shard: str = "none"
    cpu_offload: bool = False
    loss: str = "full"
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        problems: list[str] = []
        _positive_int(problems, "batch_size", self.batch_size, MAX_BATCH_SIZE)
        _positive_int(problems, "seq_len", self.seq_len, MAX_SEQ_LEN)
        _positive_int(problems, "grad_accum", self.grad_accum, MAX_GRAD_ACCUM)
        _choice(problems, "dtype", self.dtype, tuple(DTYPE_BYTES))
        _choice(problems, "attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _flag(problems, "autocast", self.autocast)
        _check(problems, self.autocast is not True or self.dtype == "fp32",
               f"autocast=True needs dtype='fp32' (mixed precision keeps fp32 master weights), "
               f"got dtype={shown(self.dtype)}")
        _flag(problems, "grad_checkpointing", self.grad_checkpointing)
        _flag(problems, "padded", self.padded)
        _flag(problems, "packed", self.packed)
        _check(problems, not (self.packed is True and self.padded is True),
               "packed=True replaces padding (rows are full, no attention mask), and padded=True: give one of them")
        _positive_int(problems, "gpus", self.gpus, MAX_GPUS)
        _choice(problems, "shard", self.shard, SHARD_STRATEGIES)
        _flag(problems, "cpu_offload", self.cpu_offload)
        _check(problems, self.cpu_offload is not True or self.shard not in ("none", "optimizer"),
               f"cpu_offload=True moves FSDP2's shards to host memory, and shard={shown(self.shard)} has none "
               f"({'ZeRO-1' if self.shard == 'optimizer' else 'DDP'}): give shard='gradients' or 'full' (FSDP2), "
               "or drop cpu_offload=True")
        _choice(problems, "loss", self.loss, LOSSES)
        _positive_int(problems, "loss_chunk_tokens", self.loss_chunk_tokens, MAX_CHUNK_TOKENS)
        if not problems and self.batch_size % self.gpus:
            problems.append(f"batch_size={self.batch_size} is not divisible by gpus={self.gpus}: every GPU computes "
                            f"batch_size / gpus rows; use a multiple of {self.gpus}")
        if not problems and self.shard != "none" and self.gpus == 1:
            problems.append(f"shard={self.shard!r} splits work across GPUs, and gpus=1: give gpus=2 or more (one GPU: "
                            "shard='none')")
        _raise(problems, "invalid training setup")

    @property
    def per_gpu_batch(self) -> int:
        """Rows of each micro-batch one GPU computes."""
        return self.batch_size // self.gpus

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

    targets: "attention" (q,k,v,o), "mlp", "all-linear", or module names like "q_proj,v_proj";
        "lm_head" in a list (e.g. "q_proj,v_proj,lm_head") also puts LoRA on the output projection
        (any family's, found by get_output_embeddings(); QLoRA keeps it unquantized, as peft does).
    use_rslora: scale by alpha / sqrt(rank) instead (rsLoRA, arXiv 2312.03732).
    modules_to_save: "", "embed_tokens", "lm_head" or "embed_tokens,lm_head" — peft's modules_to_save:
        those modules train in full. Spelled by role: "embed_tokens" (also "embeddings", GPT-2's "wte",
        NeoX's "embed_in") is the input embeddings, "lm_head" (also NeoX's "embed_out") the output
        projection; kept canonical. As peft does it (lowrank/lora.py ModulesToSave): the original stays
        frozen and a trainable copy replaces it in the forward, so those weights are held twice —
        the estimator counts both, which is what users comparing with peft see. With tied
        embeddings the copy is the module's own (untied from the other use), as in peft (which
        warns). A module cannot be both a target and saved.
    """

    method: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"
    use_rslora: bool = False
    optimizer: str = "adamw"
    modules_to_save: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str) and len(self.modules_to_save) <= MAX_TARGETS_CHARS:
            with contextlib.suppress(ValueError):  # canonical spelling, one form for every reader; validate names a bad one
                object.__setattr__(self, "modules_to_save", ",".join(parse_modules_to_save(self.modules_to_save)))
        super().__post_init__()

    def validate(self, problems: list[str]) -> None:
        _positive_int(problems, "rank", self.rank, MAX_RANK)
        _number(problems, "alpha", self.alpha, lambda v: 0 < v <= MAX_SCALE, f"a number > 0 and ≤ {MAX_SCALE:,.0f}")
        _number(problems, "dropout", self.dropout, lambda v: 0 <= v < 1, "in [0, 1)")
        _check_targets(problems, self.targets)
        _flag(problems, "use_rslora", self.use_rslora)
        _choice(problems, "optimizer", self.optimizer, OPTIMIZERS)
        if not isinstance(self.modules_to_save, str) or len(self.modules_to_save) > MAX_TARGETS_CHARS:
            problems.append(f"modules_to_save={shown(self.modules_to_save)} must be a comma-separated string "
                            "like embed_tokens,lm_head")
        else:
            try:
                saved = parse_modules_to_save(self.modules_to_save)
            except ValueError as error:
                problems.append(str(error))
            else:
                if HEAD_TARGET in saved and isinstance(self.targets, str) and self.head_lora:
                    problems.append("lm_head is both in targets and in modules_to_save; pick one (LoRA on lm_head, "
                                    "or lm_head trained in full)")

    def to_dict(self) -> dict[str, Any]:
        """The options; modules_to_save only when given (estimates of the default stay as they were)."""
        data = super().to_dict()
        if not self.modules_to_save:
            del data["modules_to_save"]
        return data

    @property
    def saved_modules(self) -> tuple[str, ...]:
        """The roles trained in full: a subset of ("embed_tokens", "lm_head")."""
        return parse_modules_to_save(self.modules_to_save)

    @property
    def head_lora(self) -> bool:
        """Does LoRA go on the output projection (targets lists "lm_head")?"""
        return HEAD_TARGET in parse_targets(self.targets)

    @property
    def block_targets(self) -> str:
        """targets without "lm_head": what selects the decoder-block linears ("" when only lm_head)."""
        if not self.head_lora:
            return self.targets
        return ",".join(t for t in parse_targets(self.targets) if t != HEAD_TARGET)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


@dataclass(frozen=True)
class QLoRAConfig(LoRAConfig):
    """QLoRA (arXiv 2305.14314): LoRA over base weights stored in 4-bit NF4 (or FP4) blocks of 64.

    double_quant quantizes the block constants again (fp32 absmax → 8 bits in blocks of 256).
    compute_dtype is the dtype the 4-bit weights are dequantized to for each matmul; "default"
    (not given) is the recipe's: bf16 for ours, fp32 for peft (transformers' BitsAndBytesConfig
    when no bnb_4bit_compute_dtype is given).
    recipe: "ours" (lowrank/qlora.py: every other weight in the setup's dtype, adapters in the
    compute dtype) or "peft", QLoRA as people run it: peft's prepare_model_for_kbit_training (every
    parameter that is not 4-bit in fp32, reentrant gradient checkpointing, input embeddings
    requiring grad), fp32 adapters, and bitsandbytes' paged AdamW (states in CUDA unified memory).
    """

    method: ClassVar[str] = "qlora"
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "default"
    recipe: str = "ours"

    def __post_init__(self) -> None:
        if self.compute_dtype == "default":  # resolved here, so every reader sees a dtype
            object.__setattr__(self, "compute_dtype", "fp32" if self.recipe == "peft" else "bf16")
        super().__post_init__()

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        _choice(problems, "quant_type", self.quant_type, QUANT_TYPES)
        _flag(problems, "double_quant", self.double_quant)
        _choice(problems, "compute_dtype", self.compute_dtype, tuple(DTYPE_BYTES))
        _choice(problems, "recipe", self.recipe, QLORA_RECIPES)


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
        _positive_int(problems, "rank", self.rank, MAX_RANK)
        _positive_int(problems, "update_proj_gap", self.update_proj_gap, MAX_UPDATE_PROJ_GAP)
        _number(problems, "scale", self.scale, lambda v: 0 < v <= MAX_SCALE, f"a number > 0 and ≤ {MAX_SCALE:,.0f}")
        _choice(problems, "proj_type", self.proj_type, PROJ_TYPES)
        _choice(problems, "optimizer", self.optimizer, LOWRANK_OPTIMIZERS)
        _flag(problems, "layerwise", self.layerwise)
        _choice(problems, "svd", self.svd, SVD_METHODS)
        _flag(problems, "stagger", self.stagger)
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
        _group_size(problems, "weight_group_size", self.weight_group_size)
        _check(problems, _is_int(self.proj_bits) and self.proj_bits in PROJ_BITS,
               f"proj_bits={shown(self.proj_bits)} must be 4, 8 or 16")
        _group_size(problems, "proj_group_size", self.proj_group_size)
        _flag(problems, "adaptive", self.adaptive)
        _number(problems, "cos_threshold", self.cos_threshold, lambda v: 0 <= v <= 1, "in [0, 1]")
        _positive_int(problems, "queue_size", self.queue_size, MAX_QUEUE_SIZE)


METHODS: dict[str, type[MethodConfig]] = {
    cls.method: cls for cls in (FullConfig, LoRAConfig, QLoRAConfig, GaLoreConfig, QGaLoreConfig)
}


def method_config(method: str, /, **options: Any) -> MethodConfig:
    """Build the dataclass of `method` from keyword options; unknown options are an error."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method={shown(method)} is not one of {', '.join(METHODS)}; pick one of those")
    if "method" in options:
        raise ValueError(f"method is not an option (got method={shown(options['method'])} among the options); "
                         f"the method is given on its own: {method}")
    cls = METHODS[method]
    known = set(cls.option_names())
    extra = [name for name in options if name not in known]
    if extra:
        users = {name: [m for m, c in METHODS.items() if name in c.option_names()] for name in extra}
        parts = [f"{name if len(name) <= MAX_SHOWN_CHARS and name.isprintable() else shown(name)} does not apply "
                 f"to method {method}"
                 + (f" (it is an option of {', '.join(users[name])})" if users[name] else "") for name in extra]
        raise ValueError("; ".join(parts))
    return cls(**options)
