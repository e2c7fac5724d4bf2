"""QLoRA: LoRA over a base model stored in 4 bits (Dettmers et al., arXiv 2305.14314).

Every linear layer inside the decoder blocks becomes a bitsandbytes `Linear4bit`: its weight is
stored as 4-bit NF4 (or FP4) codes, two per byte, in blocks of 64 values with one absmax per
block; double quantization stores those absmax values in 8 bits (blocks of 256, one fp32 constant
each, plus one fp32 offset). Then LoRA wraps the targets, with factors in `compute_dtype`.
Embeddings, norms and `lm_head` keep their dtype: no fp32 upcast of the rest of the model
(peft's `prepare_model_for_kbit_training` makes one). GPT-2's Conv1D layers (weight stored
(in, out)) become Linear4bit layers too: the weight is transposed to (out, in) before
quantization, so the 4-bit bytes are those of the equivalent nn.Linear.

    y = dequant(W4) x + (B A x) · scaling        W4 frozen; A, B trainable in compute_dtype

Memory saved: weights of the decoder linears go from 2 bytes (bf16) to ~0.516 bytes per value
(NF4 + double-quantized constants; 0.5625 without double quantization); gradients and optimizer
states exist for the adapters only. What it costs: one dequantized weight (compute dtype) alive
during each 4-bit matmul, forward and backward — bitsandbytes saves the 4-bit codes, not W, for
backward and dequantizes again there.

    model = apply_qlora(model, QLoRAConfig(rank=16, alpha=32, compute_dtype="bf16"))
    quantized_weight_bytes(model)   # what the 4-bit weights occupy, constants included

Quantized where the model is going: each decoder linear is quantized on the device of the rest of
the model (its embeddings), so a GPU run can leave the linears on the host until their turn
(lowrank/load.py `place`); the device then never holds the whole model in 16 bits.

Two recipes (QLoRAConfig.recipe). "ours", above. "peft", QLoRA as people run it with peft and
transformers (peft 0.21, transformers 5, bitsandbytes 0.50), each effect read from their code:
  * transformers' BitsAndBytesConfig computes in fp32 when no bnb_4bit_compute_dtype is given
    (QLoRAConfig's compute_dtype "default" resolves to fp32 under this recipe);
  * peft's prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not 4-bit to
    fp32 (embeddings, norms, lm_head, biases), freezes the model, enables gradient checkpointing
    with the torch default it passes through (reentrant), and, reentrant, makes the input
    embeddings' output require grad;
  * peft's LoRA layers keep their factors in fp32 (autocast_adapter_dtype);
  * the QLoRA paper's paged AdamW (bitsandbytes PagedAdamW32bit / PagedAdamW8bit): states in
    CUDA unified memory, outside PyTorch's allocator (on the CPU bitsandbytes falls back to
    ordinary tensors).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Linear4bit, Params4bit
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from estimator.config import QLoRAConfig, TrainSetup
from estimator.constants import NF4_BLOCK, torch_dtype
from estimator.targets import linear_shape, target_linears

from .distributed import Parallel
from .lora import _replace, adapters_prepared, apply_lora, is_conv1d, lora_layers, lora_parameters
from .lora import save as save  # a QLoRA adapter is a LoRA adapter (PEFT format)
from .methods import Prepared


def quantize_linear(linear: nn.Module, cfg: QLoRAConfig, device: torch.device | None = None) -> Linear4bit:
    """A Linear4bit holding `linear`'s weight quantized on `device` (default: the weight's own).

    `linear`: an nn.Linear, or GPT-2's Conv1D, whose (in, out) weight is transposed to the
    (out, in) Linear4bit computes with; the layer then carries `from_conv1d = True` (its PEFT
    adapter says `fan_in_fan_out`). The weight is cast to compute_dtype first, so that
    bitsandbytes dequantizes straight into the compute dtype (forward and backward) with no extra
    cast of a full weight. Moved first, then cast: the device briefly holds the weight in both dtypes.
    """
    compute_dtype = torch_dtype(cfg.compute_dtype)
    in_features, out_features = linear_shape(linear)
    device = linear.weight.device if device is None else device
    weight = linear.weight.detach()
    weight = (weight.T if is_conv1d(linear) else weight).to(device).to(compute_dtype).contiguous()  # (out, in)
    codes, state = bnb.functional.quantize_4bit(weight, blocksize=NF4_BLOCK, compress_statistics=cfg.double_quant,
                                                quant_type=cfg.quant_type)
    # built on "meta" so no full-precision weight is allocated, then given the quantized one
    with unset_fake_temporarily():  # real meta tensors even in a dry run: Params4bit cannot wrap fake ones
        layer = Linear4bit(in_features, out_features, bias=linear.bias is not None,
                           compute_dtype=compute_dtype, compress_statistics=cfg.double_quant,
                           quant_type=cfg.quant_type, device="meta")
    layer.weight = _quantized_parameter(codes, state, cfg, layer)
    layer.quant_state = state
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(device).to(compute_dtype), requires_grad=False)
    # On CPUs with AVX512-BF16, an eval forward without grad would repack the weight in place into
    # an inference-only layout (other bytes, other rounding, no backward); keep one layout.
    layer.support_avx512bf16_for_cpu = False
    layer.from_conv1d = is_conv1d(linear)
    return layer


def _quantized_parameter(codes: torch.Tensor, state, cfg: QLoRAConfig, layer: Linear4bit) -> nn.Parameter:
    """The codes as bitsandbytes' Params4bit; in a dry run (lowrank/dryrun.py), a frozen Parameter.

    Params4bit cannot wrap a FakeTensor (both are tensor subclasses). Linear4bit's forward reads
    only the codes and `weight.quant_state`, so a plain Parameter carrying the state runs the
    same ops on the same bytes.
    """
    if is_fake(codes):
        weight = nn.Parameter(codes, requires_grad=False)
        weight.quant_state = state
        return weight
    return Params4bit(codes, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                      compress_statistics=cfg.double_quant, quant_type=cfg.quant_type,
                      bnb_quantized=True, module=layer)


def quantize_linears(model: nn.Module, cfg: QLoRAConfig) -> nn.Module:
    """Replace every linear layer inside the decoder blocks (nn.Linear, GPT-2's Conv1D) by its
    4-bit version, in place, on the device of the model's input embeddings (the rest of the
    model). The replaced layers are freed when the last one is done."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; quantize it first (apply_qlora does both)")
    layers = target_linears(model, "all-linear")
    problems = [f"{path} is already 4-bit" if isinstance(m, Linear4bit) else
                f"{path} is a {type(m).__name__}, not nn.Linear or Conv1D" for path, m in layers
                if isinstance(m, Linear4bit) or not (isinstance(m, nn.Linear) or is_conv1d(m))]
    if problems:
        raise ValueError(f"cannot quantize: {'; '.join(problems[:3])}; apply QLoRA to a full-precision "
                         "model built from nn.Linear or GPT-2's Conv1D")
    device = model.get_input_embeddings().weight.device
    for path, linear in layers:
        _replace(model, path, quantize_linear(linear, cfg, device))
    return model


def apply_qlora(model: nn.Module, cfg: QLoRAConfig) -> nn.Module:
    """Quantize all decoder linears to 4 bits, then wrap `cfg.targets` with LoRA in compute_dtype
    (the peft recipe: prepare the model as peft does, then fp32 adapters).

    Every parameter except the adapters is frozen; the model is changed in place and returned.
    """
    quantize_linears(model, cfg)
    if cfg.recipe == "peft":
        prepare_for_kbit_training(model)
        return apply_lora(model, cfg, dtype=torch.float32)
    return apply_lora(model, cfg, dtype=torch_dtype(cfg.compute_dtype))


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """What peft's prepare_model_for_kbit_training does to a 4-bit model, as it does it (module
    docstring): freeze; cast each fp16/bf16 parameter that is not 4-bit to fp32, one at a time;
    gradient checkpointing with torch's default (reentrant), and so the input embeddings' output
    requiring grad."""
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.to(torch.float32)
    reentrant = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
    model.enable_input_require_grads()
    return model


def paged_optimizer(params: list[nn.Parameter], cfg: QLoRAConfig, lr: float, weight_decay: float):
    """The peft recipe's optimizer: bitsandbytes' paged AdamW (32-bit, or 8-bit for adamw8bit);
    None for the optimizers that have no paged form (adafactor, sgd: built as ours)."""
    if cfg.optimizer not in ("adamw", "adamw8bit"):
        return None
    import warnings

    from estimator.constants import ADAM8_MIN_SIZE

    cls = bnb.optim.PagedAdamW32bit if cfg.optimizer == "adamw" else bnb.optim.PagedAdamW8bit
    kwargs = {} if cfg.optimizer == "adamw" else {"min_8bit_size": ADAM8_MIN_SIZE}
    # on the CPU bitsandbytes falls back to ordinary tensors at the first step, and says so each time
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return cls([p for p in params if p.requires_grad], lr=lr, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=weight_decay, **kwargs)


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes the 4-bit weights occupy: codes + absmax (+ nested absmax, code table, offset).

    Per layer of N weights, with double quantization: N/2 (codes) + N/64 (8-bit absmax) +
    4·⌈N/64/256⌉ (fp32 absmax of the absmax) + 1024 (its 256-entry code table) + 64 (NF4/FP4
    table) + 4 (offset); without: N/2 + 4·N/64 + 64. Each storage counts once, which is what the
    memory tracker sees as the `weights` of the quantized layers.
    """
    seen: dict[tuple[str, int], int] = {}
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        tensors = [module.weight.data]
        state = module.weight.quant_state
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
        for t in tensors:
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------------------------- method hook
def prepare(model: nn.Module, cfg: QLoRAConfig, setup: TrainSetup, lr: float, weight_decay: float,
            grad_clip: float | None, parallel: Parallel | None = None) -> Prepared:
    """4-bit decoder linears, adapters in the compute dtype; the optimizer sees the adapters only
    (the peft recipe: a paged AdamW, unless the optimizer states are sharded)."""
    prepared = adapters_prepared(apply_qlora(model, cfg), cfg, lr, weight_decay, grad_clip, parallel)
    if cfg.recipe == "peft" and (parallel is None or parallel.strategy != "optimizer"):
        paged = paged_optimizer(lora_parameters(prepared.model), cfg, lr, weight_decay)
        if paged is not None:
            prepared.optimizer = paged
    return prepared
