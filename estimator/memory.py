"""Static memory terms: weights, adapters, gradients and optimizer states, in bytes.

Each function is one term of the memory vocabulary (docs/design.md) for one method; the formulas cite where
they come from and tests/estimator/test_memory.py checks them against real tensors (a model
built from the config, bitsandbytes 4-bit layers, torch and bitsandbytes optimizers).
"""

from __future__ import annotations

from .config import GaLoreConfig, LoRAConfig, MethodConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from .constants import ADAM8_MIN_SIZE, DTYPE_BYTES, QMAP_BYTES, adam8bit_nbytes, nf4_nbytes, quantized_nbytes
from .spec import ExpertShape, LinearShape, ModelSpec
from .targets import selects


def is_target(lin: LinearShape | ExpertShape, targets: str) -> bool:
    return selects(lin.short, lin.group, targets)


def target_linears(spec: ModelSpec, targets: str, idle: bool = False) -> list[LinearShape]:
    """The decoder-block linears a method acts on (estimator.targets rules, on shapes): those that
    train; `idle`: those no gradient reaches too (quantized and adapted all the same)."""
    return [lin for lin in (spec.held_linears if idle else spec.linears) if is_target(lin, targets)]


def projected_experts(spec: ModelSpec, method: MethodConfig) -> list[ExpertShape]:
    """The fused expert weights whose E matrices GaLore and Q-GaLore project one by one
    (lowrank/galore.py); none under LoRA and QLoRA (the experts stay frozen) or full training."""
    if not isinstance(method, GaLoreConfig):
        return []
    return [ex for ex in spec.experts if is_target(ex, method.targets)]


def saved_copies(spec: ModelSpec, method: MethodConfig) -> list[int]:
    """numel of each trainable copy LoRA's modules_to_save makes (peft's ModulesToSaveWrapper:
    the original stays, frozen): the token embedding (V × h) and/or lm_head (V × h, tied or not)."""
    if not isinstance(method, LoRAConfig):
        return []
    return [spec.vocab_size * spec.hidden_size for _ in method.saved_modules]


def head_lora_shapes(spec: ModelSpec, method: MethodConfig) -> list[tuple[int, int]]:
    """LoRA on lm_head ("lm_head" among the targets): A (r × h) and B (V × r); else none."""
    if not isinstance(method, LoRAConfig) or not method.head_lora:
        return []
    return [(method.rank, spec.hidden_size), (spec.vocab_size, method.rank)]


def int8_weight_bytes(numel: int, group_size: int) -> int:
    """A Q-GaLore INT8 weight: one byte a weight plus the group constants."""
    return quantized_nbytes(numel, 8, group_size)


def weights_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    """Every model weight as stored: trainable, frozen, quantized codes and their constants."""
    d = DTYPE_BYTES[setup.dtype]
    buffers = spec.float_buffer_numel * d + spec.other_buffer_bytes
    total = spec.params_total * d + buffers + sum(saved_copies(spec, method)) * d
    if isinstance(method, QLoRAConfig):  # QLoRA quantizes every linear of the decoder blocks
        for lin in spec.held_linears:
            weight = lin.in_features * lin.out_features
            total += lin.count * (nf4_nbytes(weight, method.double_quant) - weight * d)
    elif isinstance(method, QGaLoreConfig):
        for lin in target_linears(spec, method.targets, idle=True):
            weight = lin.in_features * lin.out_features
            total += lin.count * (int8_weight_bytes(weight, method.weight_group_size) - weight * d)
    return total


def lora_params(spec: ModelSpec, method: LoRAConfig, idle: bool = True) -> int:
    """A (r × in) and B (out × r) for every target linear (Hu et al. 2021, arXiv 2106.09685 §4);
    `idle` False: only those on linears a gradient reaches."""
    return sum(lin.count * method.rank * (lin.in_features + lin.out_features)
               for lin in target_linears(spec, method.targets, idle)) + sum(m * n for m, n in head_lora_shapes(spec, method))


def adapter_dtype_bytes(method: MethodConfig, setup: TrainSetup) -> int:
    """LoRA factors live in the weight dtype; QLoRA's in its compute dtype."""
    if isinstance(method, QLoRAConfig):
        return DTYPE_BYTES[method.compute_dtype]
    return DTYPE_BYTES[setup.dtype]


def adapters_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    if not isinstance(method, LoRAConfig):
        return 0
    return lora_params(spec, method) * adapter_dtype_bytes(method, setup)


def trainable_tensors(spec: ModelSpec, method: MethodConfig) -> list[int]:
    """numel of each trainable tensor a gradient reaches (one entry per tensor: optimizers keep
    state per tensor)."""
    if isinstance(method, LoRAConfig):
        out = []
        for lin in target_linears(spec, method.targets):
            out += [method.rank * lin.in_features, method.rank * lin.out_features] * lin.count
        return out + [m * n for m, n in head_lora_shapes(spec, method)] + saved_copies(spec, method)
    out = []
    for lin in spec.linears:
        weight = lin.in_features * lin.out_features
        out += [weight] * lin.count
        if lin.bias:
            out += [lin.out_features] * lin.count
    out += _non_linear_tensors(spec)
    return out


def _non_linear_tensors(spec: ModelSpec, projected: list[ExpertShape] | tuple = ()) -> list[int]:
    """Embeddings, lm_head, norm weights and fused expert weights, one entry per tensor (the
    experts in `projected` left out: GaLore projects them); every other parameter as one."""
    out = []
    h = spec.hidden_size
    token_embedding = spec.vocab_size * h
    out.append(token_embedding)
    if spec.embedding_params > token_embedding:
        out.append(spec.embedding_params - token_embedding)  # learned positions (GPT-2)
    if spec.lm_head_params:
        out.append(spec.lm_head_params)
    if spec.norm_params:
        per_norm = h
        n = spec.norm_params // per_norm
        out += [per_norm] * n
        if spec.norm_params - n * per_norm:
            out.append(spec.norm_params - n * per_norm)
    rest = spec.other_params - spec.expert_params
    if spec.other_tensors and sum(n * count for n, count in spec.other_tensors) == rest:
        out += [n for n, count in spec.other_tensors for _ in range(count)]
    elif rest:  # a spec built without the list
        out.append(rest)
    for ex in spec.experts:
        if ex not in projected:
            out += [ex.numel] * ex.count
    return out


def block_norm_params(spec: ModelSpec) -> int:
    """Parameters of one block's norms (the final norm is not in a block)."""
    final = spec.hidden_size * (2 if spec.family in ("gpt2", "gpt_neox") else 1)
    return (spec.norm_params - final) // spec.num_layers


def block_gradient_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> dict[str, int]:
    """Gradient bytes of one decoder block's trainable parameters: linears as "group.short",
    the two norms as "norm1" and "norm2" (full-rank methods train the norms too), and a block's
    share of the parameters in none of those groups as "other" (MoE experts' fused tensors)."""
    if isinstance(method, LoRAConfig):
        d = adapter_dtype_bytes(method, setup)
        return {f"{lin.group}.{lin.short}": method.rank * (lin.in_features + lin.out_features) * d
                for lin in target_linears(spec, method.targets)}
    d = DTYPE_BYTES[setup.dtype]
    grads = {f"{lin.group}.{lin.short}": lin.numel * d for lin in spec.linears}
    norm = block_norm_params(spec) // 2 * d
    other = {"other": spec.other_params // spec.num_layers * d} if spec.other_params else {}  # MoE experts, ...
    return {**grads, "norm1": norm, "norm2": norm, **other}


def head_gradient_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    """Gradients made by the loss end of backward: lm_head (the embedding's, when tied) and the final norm;
    LoRA: lm_head's adapters and/or its trainable copy (modules_to_save)."""
    if isinstance(method, LoRAConfig):
        adapters = sum(m * n for m, n in head_lora_shapes(spec, method)) * adapter_dtype_bytes(method, setup)
        copy = spec.vocab_size * spec.hidden_size * DTYPE_BYTES[setup.dtype] if "lm_head" in method.saved_modules else 0
        return adapters + copy
    return (spec.vocab_size + 1) * spec.hidden_size * DTYPE_BYTES[setup.dtype]


def params_trainable(spec: ModelSpec, method: MethodConfig) -> int:
    """Parameters that require a gradient, as the trainer counts them: those no gradient reaches
    included (idle linears, or LoRA's factors on them; the unreached others under full rank)."""
    if isinstance(method, LoRAConfig):
        idle = lora_params(spec, method) - lora_params(spec, method, idle=False)
    else:
        idle = spec.idle_params
    return sum(trainable_tensors(spec, method)) + idle


def gradient_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    """Gradients of every trainable tensor a gradient reaches, in its dtype (all of them exist after backward)."""
    if isinstance(method, LoRAConfig):
        return (lora_params(spec, method, idle=False) * adapter_dtype_bytes(method, setup)
                + sum(saved_copies(spec, method)) * DTYPE_BYTES[setup.dtype])
    return sum(trainable_tensors(spec, method)) * DTYPE_BYTES[setup.dtype]


def adam_state_bytes(numel: int, dtype_bytes: int, optimizer: str, step_tensor: bool = True) -> int:
    """AdamW: two moments (Loshchilov & Hutter, arXiv 1711.05101), plus the 0-d fp32 step
    tensor fused torch AdamW keeps per tensor (GaLore AdamW counts steps in Python).

    adamw8bit (Dettmers et al., arXiv 2110.02861): two uint8 moments with an fp32 absmax per
    block of 256; tensors under 4096 elements keep fp32 moments (bitsandbytes' min_8bit_size).
    """
    if optimizer == "adamw8bit":
        if numel < ADAM8_MIN_SIZE:
            return 2 * numel * 4
        return 2 * adam8bit_nbytes(numel)
    return 2 * numel * dtype_bytes + (4 if step_tensor else 0)


def qmap_bytes(numel_list: list[int], optimizer: str) -> int:
    """8-bit optimizers share one signed and one unsigned 256-entry fp32 map, created with the
    first tensor large enough to be quantized."""
    if optimizer == "adamw8bit" and any(n >= ADAM8_MIN_SIZE for n in numel_list):
        return 2 * QMAP_BYTES
    return 0


def optimizer_state_bytes(numel_list: list[int], shapes: list[tuple[int, ...] | None] | None, dtype_bytes: int,
                          optimizer: str) -> int:
    """States of a plain optimizer over tensors (numel_list) — shapes needed for Adafactor (2-D, or
    a fused expert weight's 3-D (E, m, n): factored per expert)."""
    if optimizer in ("adamw", "adamw8bit"):
        total = sum(adam_state_bytes(n, dtype_bytes, optimizer) for n in numel_list)
        return total + qmap_bytes(numel_list, optimizer)
    if optimizer == "sgd":
        return sum(numel_list) * dtype_bytes  # one momentum buffer per tensor
    if optimizer == "adafactor":
        # Shazeer & Stern 2018 (arXiv 1804.04235): factored second moments, row and column
        # sums for matrices, a full one for vectors; no first moment (torch.optim.Adafactor).
        total = 0
        for n, shape in zip(numel_list, shapes or [None] * len(numel_list)):
            if shape is not None:  # torch keeps (..., m, 1) and (..., 1, n)
                lead = n // (shape[-2] * shape[-1])
                total += lead * (shape[-2] + shape[-1]) * dtype_bytes + 4
            else:
                total += n * dtype_bytes + 4
        return total
    raise ValueError(f"optimizer={optimizer!r} is not one of adamw, adamw8bit, adafactor, sgd")


def full_optimizer_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    d = DTYPE_BYTES[setup.dtype]
    numels, shapes = [], []
    for lin in spec.linears:
        numels += [lin.in_features * lin.out_features] * lin.count
        shapes += [(lin.out_features, lin.in_features)] * lin.count
        if lin.bias:
            numels += [lin.out_features] * lin.count
            shapes += [None] * lin.count
    experts = {ex.numel: (ex.num_experts, ex.out_features, ex.in_features) for ex in spec.experts}
    for n in _non_linear_tensors(spec):
        numels.append(n)
        shapes.append((spec.vocab_size, spec.hidden_size) if n == spec.vocab_size * spec.hidden_size
                      else experts.get(n))
    return optimizer_state_bytes(numels, shapes, d, method.optimizer)


def leading_vector_length(lin: LinearShape, proj_type: str) -> int:
    """Length of a projection's leading singular vector: m for a left projection (U, m × r),
    n for a right one (Vh, r × n); std projects the smaller side, reverse_std the larger."""
    m, n = lin.out_features, lin.in_features
    side = {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right",
            "left": "left", "right": "right", "full": "left"}[proj_type]
    return m if side == "left" else n


def galore_matrix_state_bytes(lin: LinearShape, method: GaLoreConfig, d: int) -> int:
    """One projected matrix m × n (Zhao et al. 2024, arXiv 2403.03507 §4.3: mr + 2nr for m ≤ n).

    The projection is r × min(m, n) in the weight dtype (Q-GaLore: INT4 codes two to a byte
    with an fp16 scale and offset per group); Adam's two moments are r × max(m, n) in the weight
    dtype or 8-bit blockwise.
    """
    m, n = lin.out_features, lin.in_features
    r = min(method.rank, m, n)
    small, large = min(m, n), max(m, n)
    if method.proj_type == "full":
        proj_numel = r * m + r * n
        moment_numel = r * r
    else:
        proj_numel = r * small
        moment_numel = r * large
    if isinstance(method, QGaLoreConfig):
        proj = quantized_nbytes(proj_numel, method.proj_bits, method.proj_group_size)
        proj += 4 * leading_vector_length(lin, method.proj_type)  # the adaptive gap's fp32 last vector
    else:
        proj = proj_numel * d
    return proj + adam_state_bytes(moment_numel, d, method.optimizer, step_tensor=False)


def galore_optimizer_bytes(spec: ModelSpec, method: GaLoreConfig, setup: TrainSetup) -> int:
    """Projected matrices carry GaLore states; every other tensor plain (8-bit) AdamW states."""
    d = DTYPE_BYTES[setup.dtype]
    total = 0
    plain: list[int] = []
    quantized: list[int] = []  # moment sizes, to know whether the 8-bit maps exist
    experts = projected_experts(spec, method)
    matrices = [lin for lin in spec.linears if is_target(lin, method.targets)] + [ex.matrix for ex in experts]
    for lin in matrices:  # an expert's matrix: states of its own, as a linear layer's
        total += lin.count * galore_matrix_state_bytes(lin, method, d)
        r = min(method.rank, lin.in_features, lin.out_features)
        quantized.append(r * r if method.proj_type == "full" else r * max(lin.in_features, lin.out_features))
    for lin in spec.linears:
        if not is_target(lin, method.targets):
            plain += [lin.in_features * lin.out_features] * lin.count
        if lin.bias:
            plain += [lin.out_features] * lin.count
    plain += _non_linear_tensors(spec, experts)
    total += sum(adam_state_bytes(n, d, method.optimizer, step_tensor=False) for n in plain)
    return total + qmap_bytes(plain + quantized, method.optimizer)


def lora_optimizer_bytes(spec: ModelSpec, method: LoRAConfig, setup: TrainSetup) -> int:
    """States of the adapters (adapter dtype) and of modules_to_save's copies (weight dtype)."""
    d = adapter_dtype_bytes(method, setup)
    copies = saved_copies(spec, method)
    numels = trainable_tensors(spec, method)[:len(trainable_tensors(spec, method)) - len(copies)]
    shapes = []
    for lin in target_linears(spec, method.targets):
        shapes += [(method.rank, lin.in_features), (lin.out_features, method.rank)] * lin.count
    shapes += head_lora_shapes(spec, method)
    total = optimizer_state_bytes(numels, shapes, d, method.optimizer)
    if copies:  # the 8-bit maps are shared with the adapters' (made once)
        total += optimizer_state_bytes(copies, [(spec.vocab_size, spec.hidden_size)] * len(copies),
                                       DTYPE_BYTES[setup.dtype], method.optimizer)
        total -= qmap_bytes(numels, method.optimizer) if qmap_bytes(copies, method.optimizer) else 0
    return total


def optimizer_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup) -> int:
    if isinstance(method, LoRAConfig):
        return lora_optimizer_bytes(spec, method, setup)
    if isinstance(method, GaLoreConfig):
        return galore_optimizer_bytes(spec, method, setup)
    return full_optimizer_bytes(spec, method, setup)
