"""Turn a model and a method dataclass into what a training loop needs: the model and its optimizer.

    prepared = prepare(model, GaLoreConfig(rank=128), TrainSetup(dtype="bf16"), lr=1e-2)
    training_step(prepared.model, prepared.optimizer, micro_batches, setup)

One function per method, in a dict, not an if/elif ladder. The model is cast to the setup's
dtype first (QLoRA quantizes from it), then the method changes it in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from estimator.config import (
    DTYPE_BYTES,
    FullConfig,
    GaLoreConfig,
    LoRAConfig,
    MethodConfig,
    QGaLoreConfig,
    QLoRAConfig,
    TrainSetup,
)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert set(TORCH_DTYPES) == set(DTYPE_BYTES)


@dataclass
class Prepared:
    """A model ready to train with `method`, its optimizer, and how it clips gradients."""

    model: torch.nn.Module
    optimizer: object  # torch optimizer or lowrank's GaLore optimizers: step(), zero_grad(), state_dict()
    method: MethodConfig
    clip_in_loop: bool  # the loop clips (torch optimizers); GaLore optimizers clip per parameter themselves

    def trainable_parameters(self) -> int:
        extra = getattr(self.optimizer, "extra_trainable_numel", lambda: 0)()
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) + extra


def _full(model, method: FullConfig, setup, lr, weight_decay, grad_clip) -> Prepared:
    from .full import build_optimizer

    return Prepared(model, build_optimizer(model.parameters(), method.optimizer, lr, weight_decay), method, True)


def _lora(model, method: LoRAConfig, setup, lr, weight_decay, grad_clip) -> Prepared:
    from .full import build_optimizer
    from .lora import apply_lora, lora_parameters

    model = apply_lora(model, method)
    return Prepared(model, build_optimizer(lora_parameters(model), method.optimizer, lr, weight_decay), method, True)


def _qlora(model, method: QLoRAConfig, setup, lr, weight_decay, grad_clip) -> Prepared:
    from .full import build_optimizer
    from .lora import lora_parameters
    from .qlora import apply_qlora

    model = apply_qlora(model, method)
    return Prepared(model, build_optimizer(lora_parameters(model), method.optimizer, lr, weight_decay), method, True)


def _galore(model, method: GaLoreConfig, setup, lr, weight_decay, grad_clip) -> Prepared:
    from .galore import build_galore_optimizer

    optimizer = build_galore_optimizer(model, method, lr, weight_decay, grad_clip=grad_clip)
    optimizer.grad_accum = setup.grad_accum
    return Prepared(model, optimizer, method, False)


def _qgalore(model, method: QGaLoreConfig, setup, lr, weight_decay, grad_clip) -> Prepared:
    from .qgalore import build_qgalore_optimizer, quantize_model_weights

    model = quantize_model_weights(model, method)
    optimizer = build_qgalore_optimizer(model, method, lr, weight_decay, grad_clip=grad_clip)
    optimizer.grad_accum = setup.grad_accum
    return Prepared(model, optimizer, method, False)


PREPARE: dict[type, Callable[..., Prepared]] = {
    FullConfig: _full, LoRAConfig: _lora, QLoRAConfig: _qlora, GaLoreConfig: _galore, QGaLoreConfig: _qgalore,
}


def prepare(model: torch.nn.Module, method: MethodConfig, setup: TrainSetup, lr: float,
            weight_decay: float = 0.0, grad_clip: float | None = None) -> Prepared:
    """Cast `model` to `setup.dtype`, apply `method`, and build its optimizer."""
    if setup.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    dtype = TORCH_DTYPES[setup.dtype]
    if any(t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())):
        model.to(dtype)  # skipped when already cast: a dry run's fake parameters cannot be swapped (dryrun.py)
    model.train()
    return PREPARE[type(method)](model, method, setup, lr, weight_decay, grad_clip)
