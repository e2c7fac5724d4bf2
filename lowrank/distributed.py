"""Training on several devices with PyTorch's own engines: the strategies of `--shard`.

    none        DistributedDataParallel: replicated weights, gradients all-reduced in buckets
    optimizer   ZeRO-1: torch.distributed.optim.ZeroRedundancyOptimizer over the method's own
                optimizer class, on top of DDP: each rank keeps the states of its share
    gradients   ZeRO-2: torch.distributed.fsdp.fully_shard (FSDP2), parameters kept unsharded
                from forward to backward, gradients reduce-scattered
    full        ZeRO-3: fully_shard, parameters resharded after each block's forward

With `offload` (`--cpu-offload`, FSDP only) fully_shard gets torch's CPUOffloadPolicy: the
sharded parameters, gradients and optimizer states live in host memory (pinned on CUDA), each
gather starts from a host-to-device copy of the shards, each reduce-scattered gradient shard is
copied to the host, and the optimizer steps on the CPU. The process group then carries CPU
tensors too (Gloo beside NCCL: clipping reduces the norms of host gradients). On a CPU mesh
(Gloo, the tests) host and device are one memory: the policy runs, the copies are no-ops.

Under FSDP a block's every parameter is sharded with it: a mixture of experts' fused (E, m, n)
weight splits its experts (dim 0, padded to the world size), or its rows when there are fewer
experts than ranks (padding alone on some ranks otherwise; `expert_shard_dim`).

Launch: `torchrun --nproc-per-node N -m lowrank.train ...` (NCCL on CUDA, Gloo on CPU). The
batch of a step is split across the ranks: `--batch-size B` on N ranks gives each B/N rows of
every micro-batch, so N ranks train the same tokens, in the same order, as one process.

GaLore and Q-GaLore bring their own data parallelism (lowrank/galore.py): their optimizer
reduces each gradient itself — the low-rank projection between refreshes, where the subspace
is the same on every rank — and under `optimizer` each rank owns whole matrices (their
projections and moments) and broadcasts what it updated. DDP would keep every gradient in its
buckets, undoing layer-wise updates, and cannot see Q-GaLore's INT8 weights (not parameters);
FSDP would hand each rank a shard of a gradient matrix, and GaLore projects whole matrices.

    parallel = Parallel.from_env("none")              # under torchrun: this rank, its device
    prepared = prepare(model, method, setup, lr, parallel=parallel)
    local = parallel.local_batch(batch)                # this rank's rows of a global micro-batch
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from estimator.config import SHARD_STRATEGIES, MethodConfig
from estimator.distributed import FSDP_STRATEGIES, expert_shard_dim, refusal

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that waits longer for the others gives up


@dataclass
class Parallel:
    """This process's place in a data-parallel job: its rank, the world, the strategy, the device."""

    strategy: str
    world: int
    rank: int
    device: torch.device
    group: object = None  # the process group (None: the default one)
    fake: bool = False  # a dry run: rank 0 of a fake process group, on fake tensors
    offload: bool = False  # FSDP's shards in host memory (CPUOffloadPolicy)
    _mesh: object = field(default=None, repr=False)

    @classmethod
    def from_env(cls, strategy: str, device: torch.device | None = None, offload: bool = False) -> Parallel | None:
        """The job torchrun started this process in (None: a single process).

        Gloo on CPU, NCCL on CUDA (and Gloo for host tensors when offloading); each rank takes the
        GPU of its LOCAL_RANK.
        """
        if strategy not in SHARD_STRATEGIES:
            raise ValueError(f"shard={strategy!r} is not one of {', '.join(SHARD_STRATEGIES)}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "gloo" if device.type != "cuda" else "cpu:gloo,cuda:nccl" if offload else "nccl"
            dist.init_process_group(backend, timeout=TIMEOUT)
        return cls(strategy, dist.get_world_size(), dist.get_rank(), device, offload=offload)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def mesh(self):
        """The 1-D device mesh FSDP2 shards over."""
        if self._mesh is None:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            from torch.distributed.device_mesh import init_device_mesh

            with unset_fake_temporarily():  # the mesh is real ranks, even in a dry run
                self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh

    # ------------------------------------------------------------------ data
    def local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a global micro-batch (contiguous: rank r takes the r-th block)."""
        rows = next(iter(batch.values())).shape[0]
        if rows % self.world:
            raise ValueError(f"batch_size={rows} is not divisible by the {self.world} ranks; use a multiple of "
                             f"{self.world} (each rank trains batch_size / {self.world} rows)")
        size = rows // self.world
        return {k: v[self.rank * size:(self.rank + 1) * size] for k, v in batch.items()}

    # ------------------------------------------------------------------ reductions
    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks (a copy)."""
        out = value.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out.div_(self.world)

    def max(self, value: int) -> int:
        """The largest of an integer over the ranks (on the device: NCCL reduces CUDA tensors only)."""
        out = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
        return int(out.item())

    def gather_ints(self, value: int) -> list[int]:
        """An integer of every rank, in rank order: one collective (each step's peaks)."""
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [int(t.item()) for t in out]

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (every rank gets the list)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_to_main(self, obj) -> list | None:
        """`obj` of every rank, in rank order, on rank 0 (None elsewhere)."""
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module, method: MethodConfig) -> nn.Module:
        """The module the step runs forward through: DDP (none, optimizer), or the model itself
        after fully_shard (gradients, full). GaLore and Q-GaLore reduce their own gradients."""
        problem = refusal(method, self.strategy)
        if self.offload and self.strategy not in FSDP_STRATEGIES:
            problem = f"cpu_offload=True offloads FSDP2's shards, and shard={self.strategy!r} has none; use gradients or full"
        if problem:
            raise ValueError(problem)
        if method.method in ("galore", "qgalore"):
            return model
        if self.strategy in FSDP_STRATEGIES:
            return self._fully_shard(model)
        if self.fake:
            return GradientBuckets(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # bucket views: the gradients are the buckets, never a second copy. Buffers (rotary
        # frequencies) are computed alike on every rank and never trained: no broadcast per forward.
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False,
                                       process_group=self.group)

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
        from torch.distributed.tensor import Shard

        from estimator.targets import decoder_layers

        reshard = self.strategy == "full"
        _, blocks = decoder_layers(model)
        # pinned host memory needs an accelerator (and lets the copies overlap compute there); a dry
        # run's fake shards stay unpinned (the same bytes)
        pin = self.device.type == "cuda" and not self.fake
        offload = CPUOffloadPolicy(pin_memory=pin) if self.offload else OffloadPolicy()

        def placement(param: nn.Parameter) -> Shard | None:
            """A mixture of experts' fused (E, m, n) weight on fewer experts than ranks: its rows (dim 1),
            where dim 0 (FSDP2's default, padded to the world size) would leave ranks holding padding
            alone; every other parameter on dim 0 (estimator/distributed.py `expert_shard_dim`)."""
            if param.dim() == 3 and expert_shard_dim(param.shape[0], param.shape[1], self.world) == 1:
                return Shard(1)
            return None

        for block in blocks:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard, shard_placement_fn=placement,
                        offload_policy=offload)
        # the root (embeddings, final norm, head) under `full`: torch's default keeps it gathered
        # from forward into backward, which needs it first (resharding would gather it again at once)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=None if reshard else False, offload_policy=offload)
        return model

    @contextlib.contextmanager
    def no_sync(self, engine: nn.Module) -> Iterator[None]:
        """Accumulate this micro-batch's gradients locally: DDP's all-reduce waits for the last one
        (its buckets hold every gradient anyway). FSDP reduce-scatters every micro-batch and adds
        the shards: skipping it would keep every block's whole gradient until the last one."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(engine, (DistributedDataParallel, GradientBuckets)):
            with engine.no_sync():
                yield
        else:  # FSDP, or GaLore's optimizer, which reduces when the last micro-batch's gradient arrives
            yield


class GradientBuckets(nn.Module):
    """DDP's memory on fake tensors, for a dry run: DDP's C++ reducer reads tensor data (it
    verifies shapes across ranks and rebuilds its buckets after the first step), which fake
    tensors have none of. With `gradient_as_bucket_view`, DDP allocates a flat bucket per 25 MB
    of gradients when it is built and makes every gradient a view of it, alive from then on:
    this wrapper lays out the same bytes (one flat buffer per dtype) and its views. The
    all-reduce itself moves no memory (it runs in place on the buckets)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        trainable = [p for p in module.parameters() if p.requires_grad]
        for dtype in {p.dtype for p in trainable}:
            params = [p for p in trainable if p.dtype == dtype]
            bucket = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            offset = 0
            for p in params:
                p.grad = bucket[offset:offset + p.numel()].view_as(p)
                offset += p.numel()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield
