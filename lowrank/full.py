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

from .distributed import Parallel
from .methods import Prepared

SGD_MOMENTUM = 0.9


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    parallel: Parallel | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` (adamw, adamw8bit, adafactor, sgd) over `params`; under `--shard
    optimizer`, torch's ZeroRedundancyOptimizer over the same class, each rank keeping its share."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the method froze every weight")
    if name == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                              fused=_fused_ok(params))
    elif name == "adamw8bit":
        import bitsandbytes as bnb

        cls, kwargs = bnb.optim.AdamW8bit, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                                min_8bit_size=ADAM8_MIN_SIZE)
    elif name == "adafactor":
        cls, kwargs = torch.optim.Adafactor, dict(lr=lr, weight_decay=weight_decay)
    elif name == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")
    if parallel is not None and parallel.strategy == "optimizer":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=parallel.group, **kwargs)
    return cls(params, **kwargs)


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """Fused AdamW needs floating-point tensors (FSDP's DTensor shards too) on one device type it
    supports (CPU, CUDA)."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


# ---------------------------------------------------------------------------------- method hooks
def prepare(model: nn.Module, cfg: FullConfig, setup: TrainSetup, lr: float, weight_decay: float,
            grad_clip: float | None, parallel: Parallel | None = None) -> Prepared:
    """Every parameter trainable, one optimizer over all of them; the loop clips."""
    engine = parallel.wrap(model, cfg) if parallel is not None else None
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, lr, weight_decay, parallel=parallel)
    return Prepared(model, optimizer, cfg, grad_clip, engine=engine, parallel=parallel)


def save(model: nn.Module, cfg, directory: Path, base_name: str | None, final: bool,
         state: dict | None = None) -> None:
    """The model folder (`save_pretrained`): loadable by transformers, the base of a later run
    (`state`: the whole weights, when the model holds only its shards)."""
    model.save_pretrained(directory, state_dict=state)
