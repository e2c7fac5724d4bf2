"""One optimizer step, written out, and the same step measured by category.

    loss = training_step(model, optimizer, micro_batches, setup)            # train
    measured = measure_step(model, optimizer, micro_batches, setup)       # + memory by category

Forward under bf16 autocast when `setup.autocast`, loss divided by the number of
micro-batches, backward, optional clipping, optimizer step, gradients set to None. The
memory tracker marks the phases, so the peak's phase is known.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from estimator.config import TrainSetup

from .memory import Measured, MemoryTracker


def autocast(setup: TrainSetup, device_type: str):
    """bf16 autocast for mixed precision; a no-op otherwise."""
    if setup.autocast:
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(model: torch.nn.Module, optimizer, micro_batches: Sequence[dict], setup: TrainSetup,
                  grad_clip: float | None = None, tracker: MemoryTracker | None = None,
                  stats: dict | None = None) -> float:
    """Forward and backward over every micro-batch, then one update; returns the mean loss.

    `optimizer` is anything with `step()` and `zero_grad(set_to_none=True)`: a torch
    optimizer, or a GaLore optimizer (which clips per parameter itself: pass grad_clip=None).
    `stats`, when given, receives "grad_norm": the pre-clip gradient norm (None if unknown).
    """
    device_type = next(model.parameters()).device.type
    count = len(micro_batches)
    total = torch.zeros((), device=next(model.parameters()).device)
    for batch in micro_batches:
        if tracker is not None:
            tracker.phase("forward")
        with autocast(setup, device_type):
            loss = model(**batch, use_cache=False).loss / count
        if tracker is not None:
            tracker.phase("backward")
        loss.backward()
        total += loss.detach()
        del loss
        if tracker is not None and hasattr(optimizer, "gradient_tensors"):
            tracker.watch(optimizer.gradient_tensors(), "gradients")  # layer-wise sums across micro-batches
    if tracker is not None:
        tracker.phase("optimizer")
    norm = None
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    if stats is not None:
        stats["grad_norm"] = float(norm) if norm is not None else getattr(optimizer, "grad_norm", None)
    optimizer.zero_grad(set_to_none=True)
    return float(total)


def measure_optimizer_step(model: torch.nn.Module, optimizer) -> Measured:
    """The optimizer's step alone under a MemoryTracker, gradients already in place."""
    tracker = MemoryTracker()
    tracker.watch_model(model)
    tracker.watch_optimizer(optimizer)
    with tracker:
        tracker.phase("optimizer")
        optimizer.step()
    return tracker.result()


def measure_step(model: torch.nn.Module, optimizer, micro_batches: Sequence[dict], setup: TrainSetup,
                 grad_clip: float | None = None, stats: dict | None = None) -> tuple[float, Measured]:
    """`training_step` under a MemoryTracker: the loss and the measured peak by category.

    Call it after at least one step, so the optimizer states exist (the steady state the
    estimator predicts).
    """
    tracker = MemoryTracker()
    tracker.watch_model(model)
    tracker.watch_optimizer(optimizer)
    with tracker:
        loss = training_step(model, optimizer, micro_batches, setup, grad_clip, tracker, stats)
    return loss, tracker.result()
