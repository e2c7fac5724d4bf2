"""Measure the memory of a training step, by category, on any device — fake tensors included.

A `TorchDispatchMode` sees every tensor an operator creates; a weak reference on its storage
sees it die. The sum of live storages is what CUDA's allocator reports as "allocated" (CUDA
rounds each block up to 512 bytes; we do the same for CUDA tensors), so one code path measures
CPU runs, CUDA runs and `--dry-run` runs on `FakeTensorMode` tensors.

Each storage gets one category (estimator/constants.py CATEGORIES) once the step is over:

    weights, adapters, optimizer   tagged by the caller (`watch_model`, `watch(tensors, "optimizer")`)
    gradients                      became a parameter's .grad (post-accumulate-grad hook)
    activations                    saved for backward, or born in forward and still alive
                                   when forward ended (logits, checkpointed layer inputs)
    transient                      everything else: temporaries, dequantized weights, SVD work

The peak is the op at which live bytes were largest; its breakdown sums the storages alive at
that op by their final category, so a tensor born as a temporary and saved a moment later
counts as an activation.

Sharded training is counted as this rank sees it: a DTensor counts its local shard; FSDP2
frees and refills its gathered parameters by resizing their storage (`UntypedStorage.resize_`,
followed here), and those gathered weights count as `weights`, their gradients before the
reduce-scatter as `gradients`.

CPU offload (FSDP2's CPUOffloadPolicy) puts a second place beside the device: the host. The
peak and its breakdown are the device's; `host_peak_bytes` and `host_breakdown` count what is on
the host. A storage is on the host when it is on the CPU while the step computes on an
accelerator, or — on a CPU mesh, where both are one memory — when it is what the policy
offloads: the sharded parameters (`_sharded_param_data`), their gradients (from the moment the
reduce-scatter hands them over) and the optimizer states.

    tracker = MemoryTracker()
    tracker.watch_model(model); tracker.watch(prepared.state_tensors(), "optimizer")
    with tracker:
        tracker.phase("forward"); loss = model(**batch).loss
        tracker.phase("backward"); loss.backward()
        tracker.phase("optimizer"); optimizer.step(); optimizer.zero_grad()
    print(tracker.result())

(lowrank/step.py's `measure_step` does exactly this for a prepared model.)
"""

from __future__ import annotations

import bisect
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from estimator.constants import CATEGORIES, CUDA_BLOCK, PHASES


@dataclass
class Measured:
    """Peak allocated bytes of one step, the phase it fell in, and its breakdown by category."""

    peak_bytes: int
    phase: str
    breakdown: dict[str, int]
    overhead_bytes: int = 0
    phase_peaks: dict[str, int] = field(default_factory=dict)
    load_peak_bytes: int | None = None  # a dry run's load (lowrank/dryrun.py), measured the same way
    host_peak_bytes: int | None = None  # CPU offload: the host memory's peak (None: nothing offloaded)
    host_breakdown: dict[str, int] = field(default_factory=dict)  # at that peak, by category

    def to_dict(self) -> dict:
        out = {"peak_bytes": self.peak_bytes, "phase": self.phase, "breakdown": dict(self.breakdown),
               "overhead_bytes": self.overhead_bytes, "phase_peaks": dict(self.phase_peaks)}
        if self.load_peak_bytes is not None:
            out["load_peak_bytes"] = self.load_peak_bytes
        if self.host_peak_bytes is not None:  # the shape of the estimate's "host"
            out["host"] = {"peak_bytes": self.host_peak_bytes, "breakdown": dict(self.host_breakdown)}
        return out


@dataclass
class _Storage:
    nbytes: int
    born: int
    born_phase: str
    died: int | None = None
    category: str | None = None  # set by tags; None means decided at the end
    saved: bool = False
    host_since: int | None = None  # CPU offload: the clock from which it counts as host memory


def _storage_bytes(st: torch.UntypedStorage, device: torch.device) -> int:
    n = st.nbytes()
    if device.type == "cuda":
        return math.ceil(n / CUDA_BLOCK) * CUDA_BLOCK
    return n


def quantized_state_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    """Tensors a quantized layer keeps outside its parameters (bitsandbytes 4-bit constants)."""
    for param in module.parameters(recurse=False):
        state = getattr(param, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
            state = getattr(state, "state2", None)


class MemoryTracker(TorchDispatchMode):
    """Tracks live tensor storages through one step; see the module docstring."""

    def __init__(self, records: bool = True, device_type: str | None = None) -> None:
        """records=False only counts live and peak bytes (cheap enough for every step);
        device_type: count only storages on that kind of device ("cuda": a dry run's load, whose
        model starts on the host)."""
        super().__init__()
        self._keep_records = records
        self._device_type = device_type
        self._storages: dict[int, _Storage] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._records: list[_Storage] = []
        self._clock = 0
        self._current = 0
        self._peak = 0
        self._peak_clock = 0
        self._phase = "forward"
        self._phase_peaks: dict[str, int] = {}
        self._hooks: list = []
        self._saved_hooks = None
        self._forward_ends: list[int] = []  # the clock at the end of each micro-batch's forward
        self._sticky: dict[int, str] = {}  # storages that keep their category when resized back to life
        self._offloading = False  # FSDP's shards live on the host (CPUOffloadPolicy)
        self._host_type: str | None = None  # offloading from an accelerator: storages on the CPU are host's
        self._offloaded: set[int] = set()  # ids of the offloaded sharded parameters (their grads go to the host)
        self._host = self._host_peak = self._host_peak_clock = 0

    # ----------------------------------------------------------------- registration
    def _register(self, tensor: torch.Tensor, category: str | None) -> _Storage | None:
        if not isinstance(tensor, torch.Tensor):
            return None
        if isinstance(tensor, DTensor):  # a shard (FSDP2): this rank holds its local tensor only
            tensor = tensor._local_tensor
        if tensor.device.type == "meta" or self._device_type not in (None, tensor.device.type):
            return None  # meta: shapes without memory (a model built there before its weights load)
        try:
            st = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or opaque tensors
            return None
        key = id(st)
        record = self._storages.get(key)
        if record is not None:
            if category is not None and record.category is None:
                record.category = category
            return record
        self._clock += 1  # every birth and death is its own moment, so the peak's live set is exact
        record = _Storage(_storage_bytes(st, tensor.device), self._clock, self._phase, category=category)
        self._storages[key] = record
        if self._keep_records:
            self._records.append(record)
        self._refs[key] = weakref.ref(st, lambda _ref, key=key: self._on_free(key))
        self._add(record, tensor.device)
        return record

    def _add(self, record: _Storage, device: torch.device) -> None:
        """Count a newborn storage on the device, or on the host (offloading, a CPU storage beside an accelerator)."""
        if device.type == self._host_type:
            record.host_since = record.born
            self._host += record.nbytes
            self._note_host_peak()
        else:
            self._current += record.nbytes
            self._note_peak()

    def _subtract(self, record: _Storage) -> None:
        if record.host_since is not None:
            self._host -= record.nbytes
        else:
            self._current -= record.nbytes

    def _to_host(self, tensor: torch.Tensor) -> None:
        """From now on, count `tensor`'s storage as host memory (what CPU offload keeps there)."""
        record = self._storages.get(id(_local(tensor).untyped_storage()))
        if record is None or record.host_since is not None:
            return
        self._clock += 1
        record.host_since = self._clock
        self._current -= record.nbytes
        self._host += record.nbytes
        self._note_host_peak()

    def _note_host_peak(self) -> None:
        if self._host > self._host_peak:
            self._host_peak, self._host_peak_clock = self._host, self._clock

    def _on_resize(self, storage: torch.UntypedStorage) -> None:
        """A storage changed size in place: the old bytes die, the new ones are born (FSDP2)."""
        key = id(storage)
        old = self._storages.pop(key, None)
        if old is not None:
            self._clock += 1
            old.died = self._clock
            self._subtract(old)
        if storage.nbytes() == 0:
            return
        self._clock += 1
        record = _Storage(_storage_bytes(storage, storage.device), self._clock, self._phase,
                          category=self._sticky.get(key) or (old.category if old else None))
        self._storages[key] = record
        if self._keep_records:
            self._records.append(record)
        if key not in self._refs:
            self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._on_free(key))
        self._add(record, storage.device)

    def _on_free(self, key: int) -> None:
        record = self._storages.pop(key, None)
        self._refs.pop(key, None)
        if record is not None:
            self._clock += 1
            record.died = self._clock
            self._subtract(record)

    def _note_peak(self) -> None:
        if self._current > self._phase_peaks.get(self._phase, 0):
            self._phase_peaks[self._phase] = self._current
        if self._current > self._peak:
            self._peak = self._current
            self._peak_clock = self._clock

    def watch(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count tensors that exist already (or will be created outside forward) as `category`."""
        if category not in CATEGORIES:
            raise ValueError(f"category={category!r} is not one of {', '.join(CATEGORIES)}")
        for t in tensors:
            record = self._register(t, category)
            if record is not None:
                record.category = category
                self._sticky[id(_local(t).untyped_storage())] = category
                if category == "optimizer" and self._offloading:  # the states of offloaded shards: host's
                    self._to_host(t)

    def watch_model(self, model: torch.nn.Module) -> None:
        """Parameters and buffers as weights (LoRA factors as adapters), grads as gradients.

        The gradient hooks go first in each parameter's hook list, so a layer-wise optimizer
        that frees the gradient in its own hook cannot hide it. Modules with weight-gradient
        hooks of their own (Q-GaLore's Int8Linear) are watched the same way. FSDP parameters under
        CPU offload count as host memory, and so will their gradients and optimizer states.
        """
        offloaded = [p for p in _fsdp_params(model) if p.offload_to_cpu]
        if offloaded:
            self._offloading = True
            self._host_type = "cpu" if offloaded[0].device.type != "cpu" else None
            self._offloaded = {id(p.sharded_param) for p in offloaded}
        for name, param in model.named_parameters():
            self.watch([param], "adapters" if "lora_" in name else "weights")
            if param.grad is not None:
                self.watch([param.grad], "gradients")
            if param.requires_grad:
                handle = param.register_post_accumulate_grad_hook(self._on_grad)
                _run_first(getattr(param, "_post_accumulate_grad_hooks", None), handle)
                self._hooks.append(handle)
        self.watch(model.buffers(), "weights")
        for fsdp_param in offloaded:  # the shards (and gradient shards) on the host
            self._to_host(fsdp_param._sharded_param_data)
            if fsdp_param.sharded_param.grad is not None:
                self._to_host(fsdp_param.sharded_param.grad)
        for fsdp_param in _fsdp_params(model):  # gathered copies and their gradients: freed and refilled each step
            for t in fsdp_param.all_gather_outputs:
                self._sticky[id(t.untyped_storage())] = "weights"
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None and unsharded.requires_grad:
                self._hooks.append(unsharded.register_post_accumulate_grad_hook(self._on_grad))
        for module in model.modules():
            self.watch(quantized_state_tensors(module), "weights")
            if hasattr(module, "register_weight_grad_hook"):
                handle = module.register_weight_grad_hook(self._on_module_grad)
                _run_first(getattr(module, "_weight_grad_hooks", None), handle)
                self._hooks.append(handle)

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.watch([param.grad], "gradients")
            if id(param) in self._offloaded:  # a reduce-scattered shard, handed to the host
                self._to_host(param.grad)

    def _on_module_grad(self, module: torch.nn.Module) -> None:
        if getattr(module, "weight_grad", None) is not None:
            self.watch([module.weight_grad], "gradients")

    def phase(self, name: str) -> None:
        """Mark the start of a phase of the step: forward, backward or optimizer."""
        if name not in PHASES:
            raise ValueError(f"phase={name!r} is not one of {', '.join(PHASES)}")
        if self._phase == "forward" and name != "forward":
            self._forward_ends.append(self._clock)
        self._phase = name
        self._clock += 1

    # ----------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._register(t, None)
        return out

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        record = self._register(tensor, None)
        if record is not None:
            record.saved = True
        # detached: the same storage, without its grad_fn. A saved *output* kept with its grad_fn
        # would own the node that owns it — a reference cycle through C++ that no gc breaks, so a
        # node that backward never runs (an indexer behind a top-k) would keep its saved tensors
        # for good; a real step without hooks frees them with the graph (autograd restores the
        # grad_fn when it unpacks)
        return tensor.detach()

    def __enter__(self):
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved_hooks.__enter__()
        if not _RESIZES:
            torch.UntypedStorage.resize_ = _tracked_resize
        _RESIZES.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        _RESIZES.remove(self)
        if not _RESIZES:
            torch.UntypedStorage.resize_ = _resize
        self._saved_hooks.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return result

    # ----------------------------------------------------------------- results
    def _final_category(self, record: _Storage) -> str:
        if record.category is not None:
            return record.category
        if record.saved:
            return "activations"
        if record.born_phase == "forward":
            i = bisect.bisect_right(self._forward_ends, record.born)
            forward_end = self._forward_ends[i] if i < len(self._forward_ends) else self._clock
            if record.died is None or record.died > forward_end:
                return "activations"
        return "transient"

    def breakdown_at(self, clock: int, host: bool = False) -> dict[str, int]:
        """Bytes alive at `clock` (an op index) on the device (or the host), by category."""
        totals = dict.fromkeys(CATEGORIES, 0)
        for record in self._records:
            if record.born <= clock and (record.died is None or record.died > clock):
                on_host = record.host_since is not None and record.host_since <= clock
                if on_host == host:
                    totals[self._final_category(record)] += record.nbytes
        return totals

    @property
    def clock(self) -> int:
        return self._clock

    @property
    def current_bytes(self) -> int:
        return self._current

    def result(self) -> Measured:
        phase = max(self._phase_peaks, key=self._phase_peaks.get) if self._phase_peaks else "forward"
        host = self._host_peak if self._offloading else None
        if not self._keep_records:
            return Measured(self._peak, phase, {}, phase_peaks=dict(self._phase_peaks), host_peak_bytes=host)
        breakdown = self.breakdown_at(self._peak_clock)
        host_breakdown = self.breakdown_at(self._host_peak_clock, host=True) if self._offloading else {}
        return Measured(sum(breakdown.values()), phase, breakdown, phase_peaks=dict(self._phase_peaks),
                        host_peak_bytes=host, host_breakdown=host_breakdown)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _fsdp_params(model: torch.nn.Module) -> list:
    """FSDP2's per-parameter records (torch.distributed.fsdp internals) of every fully_shard-ed module."""
    from torch.distributed.fsdp import FSDPModule

    params = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            params += group.fsdp_params if group is not None else []
    return params


# UntypedStorage.resize_ is not an operator a dispatch mode sees: while trackers are active, the
# method is wrapped so that they see storages resized in place.
_RESIZES: list[MemoryTracker] = []
_resize = torch.UntypedStorage.resize_


def _tracked_resize(storage: torch.UntypedStorage, size: int):
    out = _resize(storage, size)
    for tracker in _RESIZES:
        tracker._on_resize(storage)
    return out


def _run_first(hooks, handle) -> None:
    """Put a just-registered hook first in its hook dict. Autograd walks the dict's insertion
    order (not OrderedDict's), so the entries are re-inserted rather than moved."""
    if hooks is None or handle.id not in hooks:
        return
    items = list(hooks.items())
    hooks.clear()
    hooks[handle.id] = dict(items)[handle.id]
    hooks.update((key, hook) for key, hook in items if key != handle.id)


class StepMemory:
    """Peak memory of each step: CUDA's allocator statistics, or live storages on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.tracker = None
        else:
            self.tracker = MemoryTracker(records=False)
            self.tracker.__enter__()
        return self

    def watch(self, model: torch.nn.Module, state: Iterable[torch.Tensor]) -> None:
        """The model's tensors, and the optimizer `state` tensors (CPU only: CUDA needs no tags)."""
        if self.tracker is not None:
            self.tracker.watch_model(model)
            self.tracker.watch(state, "optimizer")

    def __exit__(self, *exc):
        if self.tracker is not None:
            self.tracker.__exit__(*exc)
            self.peak = self.tracker.result().peak_bytes
        else:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return False


def cuda_measurement(measured, device: torch.device) -> dict:
    """On CUDA the allocator's own numbers are the measurement; the tracker splits them by category."""
    out = measured.to_dict()
    allocated = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    free, total = torch.cuda.mem_get_info(device)
    out["allocator_peak_bytes"] = allocated
    out["overhead_bytes"] = max(0, reserved - allocated) + max(0, (total - free) - torch.cuda.memory_reserved(device))
    out["tracker_peak_bytes"] = out["peak_bytes"]
    out["peak_bytes"] = allocated
    return out
