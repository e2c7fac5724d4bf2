"""Full training: every weight trainable, with one of four optimizers.

The baseline the low-rank methods are measured against. Memory per parameter beyond the
weights and their gradients (in the weight dtype):

    adamw       2 moments in the weight dtype (fp32 weights: 8 bytes; pure bf16: 4 bytes)
    adamw8bit   2 uint8 moments + an fp32 absmax per block of 256 (bitsandbytes, arXiv 2110.02861)
    adafactor   factored second moments: rows + columns of each matrix (arXiv 1804.04235)
    sgd         one momentum buffer

Mixed precision is `TrainSetup(dtype="fp32", autocast=True)`: the fp32 weights are the master
copy and matmuls run in bf16 under `torch.autocast`. torch AdamW runs fused (one kernel, no
temporaries) wherever the device supports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from estimator.config import OPTIMIZERS, FullConfig, TrainSetup
from estimator.constants import ADAM8_MIN_SIZE

from .methods import Prepared

SGD_MOMENTUM = 0.9


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer `name` (adamw, adamw8bit, adafactor, sgd) over `params`."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the method froze every weight")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 fused=_fused_ok(params))
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   min_8bit_size=ADAM8_MIN_SIZE)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """Fused AdamW needs floating-point tensors on one device type it supports (CPU, CUDA)."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


# ---------------------------------------------------------------------------------- method hooks
def prepare(model: nn.Module, cfg: FullConfig, setup: TrainSetup, lr: float, weight_decay: float,
            grad_clip: float | None) -> Prepared:
    """Every parameter trainable, one optimizer over all of them; the loop clips."""
    return Prepared(model, build_optimizer(model.parameters(), cfg.optimizer, lr, weight_decay), cfg, grad_clip)


def save(model: nn.Module, cfg, directory: Path, base_name: str | None, final: bool) -> None:
    """The model folder (`save_pretrained`): loadable by transformers, the base of a later run."""
    model.save_pretrained(directory)
