"""One optimizer step, written out, and the same step measured by category.

    outcome = training_step(prepared, micro_batches, setup)             # train: outcome.loss, .grad_norm
    outcome, measured = measure_step(prepared, micro_batches, setup)    # + memory by category
    measured = measure_steady_step(prepared, micro_batches, setup)      # a warm-up step, then the measured one

Forward under bf16 autocast when `setup.autocast`, loss divided by the number of micro-batches,
backward, clipping (unless the optimizer clips per layer itself), optimizer step, gradients set
to None. The memory tracker marks the phases, so the peak's phase is known.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from estimator.config import TrainSetup

from .memory import Measured, MemoryTracker
from .methods import Prepared


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step reports: the mean loss of its micro-batches and the pre-clip
    gradient norm (None when nothing computed it: no clipping in the loop or the optimizer)."""

    loss: float
    grad_norm: float | None


def autocast(setup: TrainSetup, device_type: str):
    """bf16 autocast for mixed precision; a no-op otherwise."""
    if setup.autocast:
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(prepared: Prepared, micro_batches: Sequence[dict], setup: TrainSetup,
                  tracker: MemoryTracker | None = None) -> StepOutcome:
    """Forward and backward over every micro-batch, then one update.

    In a data-parallel job (`prepared.parallel`) the micro-batches are this rank's rows; the
    gradients are reduced once, after the last one, and the loss reported is the mean over ranks.
    """
    model, optimizer, parallel = prepared.model, prepared.optimizer, prepared.parallel
    device = prepared.device
    count = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        local = parallel is not None and i < count - 1  # earlier micro-batches accumulate locally
        with parallel.no_sync(prepared.forward) if local else contextlib.nullcontext():
            if tracker is not None:
                tracker.phase("forward")
            with autocast(setup, device.type):
                loss = prepared.forward(**batch, use_cache=False).loss / count
            if tracker is not None:
                tracker.phase("backward")
            loss.backward()
        total += loss.detach()
        del loss
        if tracker is not None:  # gradients kept outside .grad (layer-wise sums across micro-batches)
            tracker.watch(prepared.gradient_tensors(), "gradients")
    if tracker is not None:
        tracker.phase("optimizer")
        tracker.watch([p.grad for p in model.parameters() if p.grad is not None], "gradients")
    norm = None
    if prepared.grad_clip is not None:
        norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                    prepared.grad_clip))
    optimizer.step()
    if prepared.lowrank is not None:
        norm = prepared.lowrank.grad_norm
    # DDP's gradients are views of its buckets, which live on: keep them (zeroed), not None
    optimizer.zero_grad(set_to_none=prepared.engine is None or prepared.engine is model)
    if parallel is not None:
        total = parallel.mean(total)
    return StepOutcome(float(total), norm)


def _tracker_for(prepared: Prepared) -> MemoryTracker:
    tracker = MemoryTracker()
    tracker.watch_model(prepared.model)
    tracker.watch(prepared.state_tensors(), "optimizer")
    return tracker


def measure_step(prepared: Prepared, micro_batches: Sequence[dict],
                 setup: TrainSetup) -> tuple[StepOutcome, Measured]:
    """`training_step` under a MemoryTracker: its outcome and the measured peak by category.

    Call it after at least one step, so the optimizer states exist (the steady state the
    estimator predicts) — or use `measure_steady_step`.
    """
    tracker = _tracker_for(prepared)
    with tracker:
        outcome = training_step(prepared, micro_batches, setup, tracker)
    return outcome, tracker.result()


def measure_steady_step(prepared: Prepared, micro_batches: Sequence[dict], setup: TrainSetup) -> Measured:
    """One step that creates the optimizer states, then the same micro-batches measured by category.

    On CUDA the allocator's peak is reset in between: `torch.cuda.max_memory_allocated()`
    afterwards is the measured step's.
    """
    training_step(prepared, micro_batches, setup)
    device = prepared.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return measure_step(prepared, micro_batches, setup)[1]


def measure_optimizer_step(prepared: Prepared) -> Measured:
    """The optimizer's step alone under a MemoryTracker, gradients already in place."""
    tracker = _tracker_for(prepared)
    with tracker:
        tracker.phase("optimizer")
        prepared.optimizer.step()
    return tracker.result()


def train_on(prepared: Prepared, batches: Sequence[dict], setup: TrainSetup) -> list[float]:
    """One step per batch at the optimizer's own learning rate: the plain loop for models a
    benchmark or a test builds itself (runs go through lowrank/recipe.py). Returns the losses."""
    return [training_step(prepared, [batch], setup).loss for batch in batches]
