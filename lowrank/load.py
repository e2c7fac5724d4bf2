"""Getting the model onto the device, and the memory it takes (estimator/load.py models it).

    with LoadMemory(device) as load:
        model, pretrained = build_model(spec, setup)      # lowrank/recipe.py: built, or loaded
        load.watch(model)
        model = place(model, method, setup, device)       # cast on the host, then moved
        prepared = prepare(model, method, setup, lr)      # the method's own work (QLoRA quantizes)
    load.peak                                             # bytes: the load's peak on the device

`place` casts on the host, one tensor at a time, so the device never holds the model in the dtype
it was built in (fp32 for a preset: twice a bf16 run's weights), then moves it. QLoRA's decoder
linears stay on the host: `prepare` quantizes them one at a time onto the device, so the device
holds the model's other weights, the 4-bit codes made so far and one layer in the compute dtype,
never the whole model in 16 bits.

The load's peak is measured where the step's is: on CUDA by the allocator (its peak since the
process started, read before the first step resets it), on the CPU by a MemoryTracker that
counts live storages (under FSDP, fully_shard moves the model block by block). Saved weights that from_pretrained maps from their files are created by no
operator the tracker sees: `watch` counts the model's tensors once it exists.
"""

from __future__ import annotations

import torch
from torch import nn

from estimator.config import MethodConfig, QLoRAConfig, TrainSetup
from estimator.constants import torch_dtype
from estimator.distributed import FSDP_STRATEGIES
from estimator.targets import target_linears

from .memory import MemoryTracker, StepMemory


def _replace_tensors(model: nn.Module, convert, skip: set[int] = frozenset()) -> None:
    """Replace each parameter's data and each buffer by `convert(tensor)` (None: keep it), module
    by module, one tensor at a time: the old one is freed before the next is converted, as in
    Module.to. A parameter tied into several modules is converted once. Modules whose id is in
    `skip` keep theirs. Where the new tensor cannot become the parameter's data (another tensor
    type: meta), the parameter is replaced in every module holding it."""
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # old (kept: its id stays its own) -> new
    for module in model.modules():
        if id(module) in skip:
            continue
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in replaced:
                module._parameters[name] = replaced[id(param)][1]
                continue
            new = convert(param.data)
            if new is None:
                continue
            if torch._has_compatible_shallow_copy_type(param.data, new):
                param.data = new  # every module holding this Parameter sees the new tensor
            else:
                module._parameters[name] = nn.Parameter(new, requires_grad=param.requires_grad)
                replaced[id(param)] = (param, module._parameters[name])
        for name, buffer in module._buffers.items():
            if buffer is not None:
                new = convert(buffer)
                if new is not None:
                    module._buffers[name] = new


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`Module.to(dtype)`, tensor by tensor (fake tensors too: a dry run's cannot be swapped by Module.to)."""
    _replace_tensors(model, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else None)
    return model


def move_model(model: nn.Module, device: torch.device, skip: set[int] = frozenset()) -> nn.Module:
    """`Module.to(device)` tensor by tensor, leaving the modules in `skip` where they are."""
    _replace_tensors(model, lambda t: t.to(device) if t.device != device else None, skip)
    return model


def host_linears(method: MethodConfig) -> bool:
    """Does `method` quantize the decoder linears onto the device itself (QLoRA)?"""
    return isinstance(method, QLoRAConfig)


def place(model: nn.Module, method: MethodConfig, setup: TrainSetup, device: torch.device | str,
          parallel=None) -> nn.Module:
    """Cast the model to the setup's dtype where it is (the host), then move it to `device`; QLoRA's
    decoder linears stay behind for `prepare` to quantize onto the device one by one. Under FSDP
    (`parallel` sharding gradients or weights) nothing moves here: fully_shard moves each block
    to the device as it shards it, so a rank never holds the whole model."""
    device = torch.device(device)
    cast_model(model, torch_dtype(setup.dtype))
    if parallel is not None and parallel.strategy in FSDP_STRATEGIES:
        return model
    skip = {id(m) for _, m in target_linears(model, "all-linear")} if host_linears(method) else set()
    return move_model(model, device, skip)


class LoadMemory:
    """The peak of building and preparing a model: CUDA's allocator peak so far, or a
    MemoryTracker's on the CPU (and on a dry run's fake tensors: `device_type` counts only
    storages there)."""

    def __init__(self, device: torch.device | str, tracker: bool | None = None) -> None:
        self.device = torch.device(device)
        use_tracker = self.device.type != "cuda" if tracker is None else tracker
        self.tracker = MemoryTracker(records=False, device_type=self.device.type) if use_tracker else None
        self.peak = 0

    def __enter__(self) -> LoadMemory:
        if self.tracker is not None:
            self.tracker.__enter__()
        return self

    def watch(self, model: nn.Module) -> None:
        """Count the model's parameters and buffers from now on (saved weights mapped from files
        were made by no operator the tracker saw)."""
        if self.tracker is not None:
            self.tracker.watch(list(model.parameters()) + list(model.buffers()), "weights")

    __exit__ = StepMemory.__exit__  # the tracker's peak, or CUDA's allocator peak
