"""The methods by name: how each one turns a model into what the loop trains, and how it saves.

    prepared = prepare(model, GaLoreConfig(rank=128), TrainSetup(dtype="bf16"), lr=1e-2)
    training_step(prepared, micro_batches, setup)          # lowrank/step.py
    save_model(prepared, "runs/x/final", base_name="llama-60m", final=True)

A method is one module of lowrank/ with two hooks, registered in METHOD_MODULES under the name
its config dataclass carries (`cfg.method`, estimator/config.py):

    def prepare(model, cfg, setup, lr, weight_decay, grad_clip, parallel) -> Prepared
    def save(model, cfg, directory, base_name, final, state) -> None   # PEFT adapter, or a model folder

`parallel` (lowrank/distributed.py, None for one process) is this rank's place in a data-parallel
job: a method changes the model, lets `parallel.wrap` wrap it (DDP, or FSDP2's fully_shard,
which must come before the optimizer sees the parameters), then builds its optimizer over what
the wrapping left.

`prepare` here does what every method shares first — gradient checkpointing, the cast to the
setup's dtype (QLoRA quantizes from it), train mode, the chunked loss (lowrank/loss.py) — then calls the method's hook, which
changes the model in place and builds its optimizer. Modules load on first use, so full training
never imports bitsandbytes.

GaLore-style optimizers (lowrank.galore, lowrank.qgalore) update weights themselves, possibly
inside backward, and clip per layer: they declare it by implementing `LowRankOptimizer`, and the
method hands them to the loop as `Prepared.lowrank`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from estimator.config import MethodConfig, TrainSetup
from estimator.constants import torch_dtype
from estimator.spec import checkpointing_problem

from .distributed import Parallel

METHOD_MODULES = {
    "full": "lowrank.full",
    "lora": "lowrank.lora",
    "qlora": "lowrank.qlora",
    "galore": "lowrank.galore",
    "qgalore": "lowrank.qgalore",
}


@runtime_checkable
class LowRankOptimizer(Protocol):
    """What an optimizer that projects gradients (GaLore, Q-GaLore) tells the training loop.

    layerwise: weights are updated in backward hooks, each gradient freed at once.
    grad_accum: micro-batches per step (given at construction: layer-wise hooks need it).
    """

    layerwise: bool
    grad_accum: int

    @property
    def grad_norm(self) -> float | None:
        """Global norm of the last step's pre-clip gradients (the optimizer clips per layer itself)."""
        ...

    def gradient_tensors(self) -> list[Tensor]:
        """Gradients held outside `param.grad` (layer-wise low-rank sums, INT8 layers' weight_grad)."""
        ...

    def state_tensors(self) -> list[Tensor]:
        """Every tensor of the optimizer state: moments, projections, quantization maps."""
        ...

    def layer_info(self) -> list[dict]:
        """Per projected weight: name, shape, rank, refresh gap, SVDs done (the app plots it)."""
        ...

    def extra_trainable_numel(self) -> int:
        """Trained values that are not parameters (Q-GaLore's INT8 weights)."""
        ...


@dataclass
class Prepared:
    """A model ready to train with `method`, and its optimizer.

    grad_clip: the loop clips the global gradient norm to it (None: no clipping in the loop).
    lowrank: the optimizer again when it is a LowRankOptimizer (it clips by itself).
    engine: what the step runs forward through, when not the model itself (DDP's wrapper).
    parallel: this rank's data-parallel job (lowrank/distributed.py), None for one process.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    method: MethodConfig
    grad_clip: float | None = None
    lowrank: LowRankOptimizer | None = None
    engine: nn.Module | None = None
    parallel: Parallel | None = None

    @property
    def forward(self) -> nn.Module:
        return self.engine if self.engine is not None else self.model

    @property
    def device(self) -> torch.device:
        """Where the step computes: the rank's device, or the parameters' (CPU offload keeps FSDP's
        sharded parameters on the host while the step computes on the GPU)."""
        return self.parallel.device if self.parallel is not None else next(self.model.parameters()).device

    def trainable_parameters(self) -> int:
        extra = self.lowrank.extra_trainable_numel() if self.lowrank else 0
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) + extra

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the optimizer holds (what memory tracking counts as `optimizer`)."""
        if self.lowrank is not None:
            return self.lowrank.state_tensors()
        optimizer = self.optimizer
        if isinstance(optimizer, ZeroRedundancyOptimizer):  # ZeRO-1: this rank's share, in its local optimizer
            optimizer = optimizer.optim
        return [t for state in optimizer.state.values() for t in _tensors_in(state)]

    def gradient_tensors(self) -> list[Tensor]:
        return self.lowrank.gradient_tensors() if self.lowrank else []

    def layer_info(self) -> dict | None:
        """Per-layer refresh gaps and SVD counts, as one metrics line holds them (None: no projection)."""
        if self.lowrank is None:
            return None
        rows = self.lowrank.layer_info()
        return {"names": [r["name"] for r in rows], "gap": [r["gap"] for r in rows],
                "svd_count": [r["svd_count"] for r in rows]}


def _tensors_in(value) -> list[Tensor]:
    """Tensors nested in a torch optimizer's state (dicts, lists)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


@dataclass(frozen=True)
class Method:
    """A method's two hooks (see the module docstring)."""

    name: str
    prepare: Callable[..., Prepared]
    save: Callable[..., None]


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError names the known ones."""
    if name not in METHOD_MODULES:
        raise ValueError(f"method={name!r} is not one of {', '.join(METHOD_MODULES)}; pick one of those")
    module = importlib.import_module(METHOD_MODULES[name])
    return Method(name, module.prepare, module.save)


def prepare(model: nn.Module, method: MethodConfig, setup: TrainSetup, lr: float,
            weight_decay: float = 0.0, grad_clip: float | None = None, parallel: Parallel | None = None) -> Prepared:
    """Checkpointing, the cast to `setup.dtype`, train mode; then the method's own hook."""
    if setup.grad_checkpointing:
        problem = checkpointing_problem(getattr(model.config, "model_type", None))
        if problem:
            raise ValueError(problem)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    dtype = torch_dtype(setup.dtype)
    if any(t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())):
        model.to(dtype)  # skipped when already cast: a dry run's fake parameters cannot be swapped (dryrun.py)
    model.train()
    if setup.loss == "chunked":  # before the method wraps it: DDP's and FSDP2's hooks run around the new forward
        from .loss import install

        install(model, setup.loss_chunk_tokens)
    return get_method(method.method).prepare(model, method, setup, lr, weight_decay, grad_clip, parallel)


def save_model(prepared: Prepared, directory: str | Path, base_name: str | None, final: bool = False) -> Path:
    """A usable copy of the trained model in `directory`: a PEFT adapter for LoRA/QLoRA, a model
    folder otherwise (`final`: the last one, which may convert the model, as Q-GaLore dequantizes).

    Every rank of a job calls it: FSDP's shards are gathered (`state`: the whole state dict the
    hook writes instead of the model's own), and rank 0 writes."""
    from torch.distributed.fsdp import FSDPModule

    directory = Path(directory)
    state = None
    if isinstance(prepared.model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(prepared.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if prepared.parallel is None or prepared.parallel.is_main:
        get_method(prepared.method.method).save(prepared.model, prepared.method, directory, base_name, final, state)
    if prepared.parallel is not None:
        prepared.parallel.barrier()
    return directory
