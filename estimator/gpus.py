"""GPUs: the catalog (assets/gpus.json), which of them fit a step, the largest batch or
sequence that fits one, and how many of one a sharded step needs.

A step fits when its allocated peak plus the overhead (CUDA context, allocator slack) is at
most the card's memory. The largest batch and sequence are found by doubling then bisection,
which is exact because the estimate grows monotonically with both (tests check it). With
`gpus > 1` every number is per GPU: the batch searched is each GPU's micro-batch, and the GPU
count searched keeps that micro-batch while sharding divides weights, gradients and states.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from .config import MAX_GPUS, MethodConfig, TrainSetup
from .estimate import Estimate, GiB, estimate_spec
from .spec import ASSETS, ModelSpec


@dataclass(frozen=True)
class GPU:
    name: str
    memory_mib: int
    kind: str

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 2**20


@lru_cache(maxsize=1)
def gpu_catalog() -> tuple[GPU, ...]:
    data = json.loads(Path(ASSETS / "gpus.json").read_text())
    return tuple(GPU(**g) for g in data["gpus"])


def find_gpu(name: str) -> GPU:
    """A GPU from the catalog by name, case and spaces ignored; ValueError suggests close names."""
    key = name.lower().replace(" ", "").replace("-", "")
    for gpu in gpu_catalog():
        if gpu.name.lower().replace(" ", "").replace("-", "") == key:
            return gpu
    names = [g.name for g in gpu_catalog()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known GPUs: {', '.join(names)}"
    raise ValueError(f"gpu={name!r} is not in the catalog; {hint}")


def fit_table(est: Estimate) -> list[dict]:
    """Every catalog GPU: does this step fit (allocated peak + overhead ≤ memory), and the headroom."""
    need = est.total_bytes
    return [{"gpu": g.name, "memory_gib": round(g.memory_bytes / GiB, 1), "fits": need <= g.memory_bytes,
             "headroom_gib": round((g.memory_bytes - need) / GiB, 2)} for g in gpu_catalog()]


def _first(test, start: int, stop: int) -> int | None:
    """Smallest n in [start, stop] with test(n) true, for a test that stays true once it is (None:
    none is). Doubling from `start` brackets it, bisection finds it."""
    if test(start):
        return start
    lo, hi = start, start * 2  # test(lo) is false
    while hi < stop and not test(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, stop)
    if not test(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if test(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _largest(fits, upper: int) -> int | None:
    """Largest n in [1, upper] with fits(n) true, assuming fits is monotone; None if even 1 fails."""
    if not fits(1):
        return None
    return _first(lambda n: n > upper or not fits(n), 1, upper + 1) - 1


def max_batch_size(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, gpu: GPU,
                   upper: int = 1 << 16) -> int | None:
    """The largest micro-batch one GPU computes that fits `gpu` at this sequence length, at the
    setup's GPU count and sharding (None: not even 1)."""
    def fits(batch: int) -> bool:
        one = replace(setup, batch_size=batch * setup.gpus)
        return estimate_spec(spec, method, one).total_bytes <= gpu.memory_bytes

    return _largest(fits, upper)


def max_seq_len(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, gpu: GPU) -> int | None:
    """The longest sequence that fits `gpu` at this batch size, up to the model's maximum position."""
    def fits(seq: int) -> bool:
        return estimate_spec(spec, method, replace(setup, seq_len=seq)).total_bytes <= gpu.memory_bytes

    return _largest(fits, spec.max_position or 1 << 20)


def per_gpu_bytes(spec: ModelSpec, method: MethodConfig, setup: TrainSetup):
    """n -> the bytes one GPU needs when `n` GPUs share the step under `setup.shard`, each at the
    setup's per-GPU micro-batch (one GPU shards nothing); remembers what it computed, so a table
    over many GPUs searches the same counts once."""
    micro, known = setup.per_gpu_batch, {}

    def need(n: int) -> int:
        if n not in known:
            at = replace(setup, gpus=n, batch_size=micro * n, shard=setup.shard if n > 1 else "none",
                         cpu_offload=setup.cpu_offload and n > 1)
            known[n] = estimate_spec(spec, method, at).total_bytes
        return known[n]

    return need


def gpus_needed(spec: ModelSpec, method: MethodConfig, setup: TrainSetup, gpu: GPU,
                most: int = 1024, need=None) -> int | None:
    """The fewest of `gpu` that fit the step under `setup.shard`, each GPU computing the setup's
    per-GPU micro-batch; None when no count up to `most` fits. `need`: per_gpu_bytes(...) shared
    across GPUs.

    Under `none` (DDP) every GPU holds the whole model, so it is 1 or None. Sharding needs two
    or more, and per-GPU memory falls as the count grows (FSDP's padding to the world size
    aside, a few bytes): doubling finds a count that fits, bisection the fewest.
    """
    need = need or per_gpu_bytes(spec, method, setup)

    def fits(n: int) -> bool:
        return need(n) <= gpu.memory_bytes

    if fits(1):
        return 1
    if setup.shard == "none":
        return None
    return _first(fits, 2, min(most, MAX_GPUS))
