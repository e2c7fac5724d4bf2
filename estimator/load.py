"""The load: the peak while the model is built (or loaded) and prepared, before the first step.

A step's peak is not all a GPU must hold: getting the model there can hold more. This is the
trainer's path (lowrank/load.py `place`, lowrank/methods.py `prepare`), modeled tensor by tensor:

    1. built     a preset, a config.json or a folder without weights is built at random in the
                 config's dtype (fp32 when it names none); a folder with weights (or a hub id) is
                 loaded by `from_pretrained` in the checkpoint's dtype (transformers' dtype="auto")
    2. cast      on the host, one tensor at a time, to the setup's dtype: each new copy sits beside
                 its old self, the old one freed before the next tensor is cast
    3. moved     to the device in the setup's dtype (QLoRA: all but the decoder linears)
    4. method    LoRA adds its factors; QLoRA quantizes the decoder linears one at a time onto the
                 device (each weight in the compute dtype, then its 4-bit codes and constants;
                 double quantization briefly holds the fp32 absmax twice); Q-GaLore quantizes its
                 targets to INT8 one at a time, through fp32 work blocks; full training and GaLore
                 add nothing. No optimizer allocates anything here: AdamW, 8-bit AdamW, Adafactor,
                 SGD and GaLore create their states in the first step, beside that step's
                 gradients — the step's "optimizer" moment.

On the CPU one memory holds everything, so steps 1 and 2 count (the build dtype's model beside
the newest cast copy); on a GPU only what reaches it counts (3 and 4). Several GPUs: under DDP and
ZeRO-1 every rank loads the whole model as one GPU does; under FSDP (shard gradients or full)
the model stays on the host and fully_shard moves it block by block, each rank keeping its shard. QLoRA's quantization keeps
every replaced linear alive until the last one is done (host memory on a GPU; the same memory on
the CPU).

The peft recipe (QLoRAConfig.recipe="peft", "QLoRA as people run it") then does what
`peft.prepare_model_for_kbit_training` does: every parameter that is not 4-bit (embeddings,
norms, lm_head, biases) is cast to fp32 — again one tensor at a time — and the adapters are fp32
(peft's autocast_adapter_dtype).

    load = load_moment(spec, QLoRAConfig(), TrainSetup(dtype="bf16"), device="cuda")
    load.peak_bytes, load.moment, load.breakdown     # {"weights", "cast", "quantized", "quantizing", "adapters"}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from math import ceil
from pathlib import Path

from . import constants
from .config import GaLoreConfig, LoRAConfig, MethodConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from .constants import DTYPE_BYTES, NF4_BLOCK, nf4_nbytes, quantized_nbytes
from .distributed import FSDP_STRATEGIES
from .spec import ModelSpec

PARTS = ("weights", "cast", "quantized", "quantizing", "adapters")
_DTYPE_NAMES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
_SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


@dataclass(frozen=True)
class Load:
    """The load's peak, the moment it falls in and its breakdown (PARTS)."""

    peak_bytes: int
    moment: str
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "moment": self.moment, "breakdown": dict(self.breakdown)}


# ------------------------------------------------------------------------------ where the model comes from
def dtype_name(value) -> str | None:
    """"bf16" for torch.bfloat16, "bfloat16", "torch.bfloat16" …; None for anything else."""
    if value is None:
        return None
    return _DTYPE_NAMES.get(str(value).removeprefix("torch."))


def is_built(source: str) -> bool:
    """Does the trainer build `source` from its config (lowrank.recipe.build_model: a preset, a
    config.json, a folder without weights) rather than load saved weights (a folder with
    *.safetensors or *.bin, a hub id)?"""
    from .spec import preset_names

    if source in preset_names():
        return True
    path = Path(os.path.expanduser(source))
    if path.suffix == ".json":
        return True
    return path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin"))


def checkpoint_dtype(path: Path) -> str | None:
    """The dtype of the first floating tensor in a folder's safetensors files (their JSON header only)."""
    for file in sorted(path.glob("*.safetensors")):
        try:
            with file.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size <= 100 << 20:
                    continue
                header = json.loads(f.read(size))
        except (OSError, ValueError):
            continue
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def weights_dtype(source: str, config: dict) -> str | None:
    """The dtype `from_pretrained` loads `source`'s saved weights in (transformers' dtype="auto":
    the config's dtype, else the checkpoint's, else fp32); None when the trainer builds the model
    from its config instead."""
    if is_built(source):
        return None
    named = dtype_name(config.get("dtype") or config.get("torch_dtype"))
    if named:
        return named
    path = Path(os.path.expanduser(source))
    return (checkpoint_dtype(path) if path.is_dir() else None) or "fp32"


def built_dtype(spec: ModelSpec) -> str:
    """The dtype the model exists in before the trainer casts it: the saved weights' (a folder with
    weights), else the config's dtype (from_config builds in it), else fp32 (torch's default)."""
    saved = getattr(spec, "weights_dtype", None)
    if saved:
        return saved
    return dtype_name(spec.config.get("dtype") or spec.config.get("torch_dtype")) or "fp32"


# ------------------------------------------------------------------------------ the model's tensors
def _block_order(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """(kind, numel, block) of every floating tensor in the order Module.to visits them: the
    embeddings, each block (its linears' weights and biases, norms, other parameters), the final
    norm, lm_head, then the float buffers. kind: "linear", "bias" or "other"."""
    from .memory import block_norm_params

    h = spec.hidden_size
    out: list[tuple[str, int, int]] = [("other", spec.vocab_size * h, -1)]
    if spec.embedding_params > spec.vocab_size * h:
        out.append(("other", spec.embedding_params - spec.vocab_size * h, -1))
    per_block_norms = block_norm_params(spec)
    per_block_other = spec.other_params // spec.num_layers if spec.num_layers else 0
    for b in range(spec.num_layers):
        for lin in spec.held_linears:
            if b < lin.count:
                out.append(("linear", lin.in_features * lin.out_features, b))
                if lin.bias:
                    out.append(("bias", lin.out_features, b))
        if per_block_norms:
            out.append(("other", per_block_norms, b))
        if per_block_other:
            out.append(("other", per_block_other, b))
    final = spec.norm_params - per_block_norms * spec.num_layers
    if final:
        out.append(("other", final, -1))
    rest = spec.other_params - per_block_other * spec.num_layers
    if rest:
        out.append(("other", rest, -1))
    if spec.lm_head_params:
        out.append(("other", spec.lm_head_params, -1))
    if spec.unreached_params:  # a multimodal model's towers
        out.append(("other", spec.unreached_params, -1))
    if spec.float_buffer_numel:
        out.append(("other", spec.float_buffer_numel, -1))
    return out


def _linears_in_order(spec: ModelSpec, targets: str) -> list[tuple[int, int]]:
    """(weight numel, bias numel) of each decoder linear `targets` selects, block by block."""
    from .memory import is_target

    out = []
    for b in range(spec.num_layers):
        for lin in spec.held_linears:
            if b < lin.count and is_target(lin, targets):
                out.append((lin.in_features * lin.out_features, lin.out_features if lin.bias else 0))
    return out


def _blocks(spec: ModelSpec, targets: str, last: bool) -> tuple[list[tuple[int, int]], int]:
    """The linears to scan one at a time and how many blocks come before them: when every block has
    the same linears, only the first block's (`last` False) or the last one's — the others' sums
    only shift the totals, and a quantization's running total moves one way — else every block's."""
    from .memory import is_target

    chosen = [lin for lin in spec.held_linears if is_target(lin, targets)]
    if any(lin.count != spec.num_layers for lin in chosen):
        return _linears_in_order(spec, targets), 0
    block = [(lin.in_features * lin.out_features, lin.out_features if lin.bias else 0) for lin in chosen]
    return block, (spec.num_layers - 1 if last else 0)


# ------------------------------------------------------------------------------ what each step holds
class _Scan:
    """Candidate moments, each a breakdown over PARTS; the largest total is the load's peak."""

    def __init__(self) -> None:
        self.moments: dict[str, dict[str, int]] = {}

    def add(self, name: str, **parts: int) -> None:
        moment = {p: int(parts.get(p, 0)) for p in PARTS}
        if name not in self.moments or sum(moment.values()) > sum(self.moments[name].values()):
            self.moments[name] = moment

    def peak(self) -> Load:
        name = max(self.moments, key=lambda k: sum(self.moments[k].values()))
        return Load(sum(self.moments[name].values()), name, self.moments[name])


def cast_peak(scan: _Scan, name: str, tensors: list[int], old: int, new: int, rest: int, **others: int) -> int:
    """Cast `tensors` (numels, in order) from `old` to `new` bytes an element one at a time, beside
    `rest` bytes of other weights; each copy is made before its original is freed. Returns the
    bytes of the cast tensors afterwards."""
    held = sum(tensors) * old
    for n in tensors:
        scan.add(name, weights=rest + held, cast=n * new, **others)
        held += n * (new - old)
    return held


def nf4_quantize_bytes(numel: int, double_quant: bool) -> int:
    """At its worst moment, quantizing one weight to 4 bits holds its stored bytes (nf4_nbytes) and,
    with double quantization, the fp32 absmax twice (it and its centered copy, both freed next)."""
    extra = 8 * ceil(numel / NF4_BLOCK) if double_quant else 0
    return nf4_nbytes(numel, double_quant) + extra


def _conv1d(spec: ModelSpec) -> bool:
    """GPT-2 stores its decoder linears as Conv1D, weight (in, out): quantizing one transposes it."""
    return spec.model_type == "gpt2"


def nf4_layer_bytes(numel: int, t: int, c: int, host: bool, conv1d: bool, double_quant: bool) -> int:
    """lowrank.qlora.quantize_linear's worst moment on one weight (`t`: its bytes an element, `c`:
    the compute dtype's): `weight.to(device).to(compute).contiguous()`, each step a new tensor
    beside the last one (on the host the first is the model's own; Conv1D's transposed weight needs
    the contiguous copy), then the 4-bit codes beside the weight in the compute dtype."""
    steps = [0 if host else numel * t]  # the weight on the device
    if c != t:
        steps.append(numel * c)
    if conv1d:
        steps.append(numel * c)
    held = max([a + b for a, b in zip(steps, steps[1:])] + [steps[-1]])
    return max(held, steps[-1] + nf4_quantize_bytes(numel, double_quant))


def int8_quantize_work(numel: int, group_size: int) -> int:
    """lowrank.quant.quantize's temporaries on one weight: a work block of at most
    constants.QUANT_BLOCK elements in fp32 and its uint8 codes, and per group of the block its
    fp32 min and max and the fp16 scale and offset being made."""
    block = min(numel, constants.QUANT_BLOCK // group_size * group_size) if numel >= group_size else numel
    groups = ceil(block / group_size)
    return 5 * block + 12 * groups


def load_moment(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, device: str = "cuda") -> Load:
    """The peak of getting `spec` onto `device` and preparing it for `method` (module docstring)."""
    t = DTYPE_BYTES[setup.dtype]
    built = built_dtype(spec)
    s = DTYPE_BYTES[built]
    order = _block_order(spec)
    floating = [n for _, n, _ in order]
    fixed = spec.other_buffer_bytes  # integer buffers: never cast
    scan = _Scan()
    host = device == "cpu"
    if not host and setup.gpus > 1 and setup.shard in FSDP_STRATEGIES:
        return _fsdp(spec, method, setup, order)
    qlora = isinstance(method, QLoRAConfig)
    linear_bytes = sum(n for kind, n, _ in order if kind in ("linear", "bias")) * t
    if host:
        # from_config makes a tied lm_head of its own first, then ties it to the embeddings
        untied = spec.vocab_size * spec.hidden_size * s if spec.tie_word_embeddings and not spec.weights_dtype else 0
        scan.add(f"built ({built})", weights=fixed + sum(floating) * s, cast=untied)
        if built != setup.dtype:
            cast_peak(scan, f"cast to {setup.dtype}", floating, s, t, fixed)
        weights = fixed + sum(floating) * t
    else:  # arrives cast, one tensor at a time; QLoRA's decoder linears wait on the host
        weights = fixed + sum(floating) * t - (linear_bytes if qlora else 0)
        scan.add(f"weights on the device ({setup.dtype})", weights=weights)
    if qlora:
        _qlora(scan, spec, method, setup, host, weights, linear_bytes)
    elif isinstance(method, QGaLoreConfig):
        _qgalore(scan, spec, method, setup, weights)
    elif isinstance(method, LoRAConfig):
        from .memory import adapters_bytes

        scan.add("adapters added", weights=weights, adapters=adapters_bytes(spec, method, setup))
    elif not isinstance(method, GaLoreConfig):
        pass  # full training: the optimizer allocates its states in the first step
    return scan.peak()


def _fsdp(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, order: list[tuple[str, int, int]]) -> Load:
    """FSDP (gradients, full): the model stays on the host, cast; fully_shard moves each block to
    the GPU whole, keeps this rank's shard and frees the rest, then the root (embeddings, final
    norm, lm_head, buffers). LoRA's factors were added on the host: they travel with their block.
    CPU offload: each parameter's shard is cut on the GPU and copied to the host at once
    (FSDPParam._init_sharded_param), so the GPU keeps no shards: a block (or the root) beside its
    largest tensor's shard, then the buffers alone."""
    from .memory import lora_params

    t, n = DTYPE_BYTES[setup.dtype], setup.gpus
    adapters = lora_params(spec, method) * t if isinstance(method, LoRAConfig) else 0
    blocks, largest = [0] * spec.num_layers, [0] * (spec.num_layers + 1)  # the root's last
    root = spec.other_buffer_bytes
    for _, numel, block in order:
        if block >= 0:
            blocks[block] += numel * t
        else:
            root += numel * t
        largest[block] = max(largest[block], numel * t)
    scan, shards = _Scan(), 0
    for block, big in zip(blocks, largest):
        block += adapters // max(spec.num_layers, 1)
        if setup.cpu_offload:
            scan.add("fully_shard: a block", weights=block, cast=ceil(big / n))
            continue
        scan.add("fully_shard: a block", weights=shards + block, cast=ceil(block / n))
        shards += ceil(block / n)
    scan.add("fully_shard: the root", weights=shards + root, cast=ceil((largest[-1] if setup.cpu_offload else root) / n))
    return scan.peak()


def _qlora(scan: _Scan, spec: ModelSpec, method: QLoRAConfig, setup: TrainSetup, host: bool, weights: int,
           linear_bytes: int) -> None:
    """Each decoder linear in turn: its weight in the compute dtype (on a GPU: moved first), its
    4-bit codes; the replaced layers stay alive until the last one is done. Then the peft recipe's
    fp32 cast of the rest, then the adapters."""
    from .memory import lora_params

    t, c = DTYPE_BYTES[setup.dtype], DTYPE_BYTES[method.compute_dtype]
    conv1d = _conv1d(spec)
    new_bias = c if (c != t or not host) else 0  # a 4-bit layer's bias: a new tensor, or the old one
    layers, before = _blocks(spec, "all-linear", last=True)  # the total only grows: the last block's peak
    quantized = before * sum(nf4_nbytes(n, method.double_quant) for n, _ in layers)
    biases = before * sum(bias for _, bias in layers) * new_bias
    for n, bias in layers:
        scan.add("quantize to 4 bits", weights=weights + biases, quantized=quantized,
                 quantizing=nf4_layer_bytes(n, t, c, host, conv1d, method.double_quant))
        quantized += nf4_nbytes(n, method.double_quant)
        biases += bias * new_bias
    rest = weights - (linear_bytes if host else 0) + biases  # the replaced linears are freed
    if method.recipe == "peft" and t != 4:  # prepare_model_for_kbit_training: what is not 4-bit to fp32
        others = [n for kind, n, _ in _block_order(spec) if kind == "other"]
        before = sum(others) * t
        rest += cast_peak(scan, "cast to fp32 (peft)", others, t, 4, rest - before, quantized=quantized) - before
    adapter_bytes = 4 if method.recipe == "peft" else c
    scan.add("adapters added", weights=rest, quantized=quantized, adapters=lora_params(spec, method) * adapter_bytes)


def _qgalore(scan: _Scan, spec: ModelSpec, method: QGaLoreConfig, setup: TrainSetup, weights: int) -> None:
    """Each target linear in turn, where the model is: its INT8 codes and fp16 group constants
    through fp32 work blocks; the float weight is freed once its layer is replaced."""
    t = DTYPE_BYTES[setup.dtype]
    g = method.weight_group_size
    quantized = 0
    layers, _ = _blocks(spec, method.targets, last=False)  # each layer frees more than it stores: the first block's peak
    for n, _ in layers:
        stored = quantized_nbytes(n, 8, g)
        flat = n * t if _conv1d(spec) else 0  # Conv1D: the transposed weight flattened is a copy
        scan.add("quantize to INT8", weights=weights, quantized=quantized,
                 quantizing=flat + stored + int8_quantize_work(n, g))
        weights -= n * t
        quantized += stored


# ------------------------------------------------------------------------------ the peft recipe's step
def step_setup(method: MethodConfig, setup: TrainSetup) -> tuple[TrainSetup, list[str]]:
    """The setup a step runs with, and notes: under QLoRA's peft recipe every weight that is not
    4-bit is fp32 (so are the hidden states between the 4-bit matmuls) and gradient checkpointing
    is on (peft's prepare_model_for_kbit_training); any other method runs `setup` as given."""
    if not (isinstance(method, QLoRAConfig) and method.recipe == "peft"):
        return setup, []
    from dataclasses import replace

    notes = [f"peft recipe: embeddings, norms and lm_head in fp32, {method.compute_dtype} compute, reentrant "
             "gradient checkpointing with the input embeddings requiring grad, fp32 adapters "
             "(peft's prepare_model_for_kbit_training; transformers' bitsandbytes defaults)"]
    if method.compute_dtype != "fp32":
        notes.append(f"peft recipe with {method.compute_dtype} compute: hidden states mix fp32 and "
                     f"{method.compute_dtype}; activations are estimated as fp32 (approximate)")
    return replace(setup, dtype="fp32", grad_checkpointing=True), notes


def paged_states(method: MethodConfig, device: str, moments: dict[str, dict[str, int]],
                 notes: list[str]) -> dict[str, dict[str, int]]:
    """The peft recipe's paged AdamW keeps its states in CUDA unified memory, outside PyTorch's
    allocator (bitsandbytes pages them to the CPU under memory pressure): on a GPU they leave the
    allocated peak, and a note says how much they are. On the CPU they are ordinary tensors."""
    if not (isinstance(method, QLoRAConfig) and method.recipe == "peft" and device != "cpu"):
        return moments
    states = max(m.get("optimizer", 0) for m in moments.values())
    if states:
        notes.append(f"paged optimizer states: {states / 2**20:,.1f} MiB in CUDA unified memory, not in the "
                     "allocated peak (paged to the CPU when the GPU runs short)")
    return {name: {**m, "optimizer": 0} for name, m in moments.items()}
