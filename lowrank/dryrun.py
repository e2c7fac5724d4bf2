"""Dry run: one training step of the real code on fake tensors — a 70B model "measured" on a laptop.

The model is built on the meta device (shapes, no weights), cast to the setup's dtype there, and
its parameters and buffers become `FakeTensor`s: tensors with a shape, a dtype and a device but no
memory, whose operators only compute output shapes. Then everything is the code of a real run:
`prepare` applies the method (QLoRA quantizes through bitsandbytes, Q-GaLore into INT8 groups),
a warm-up step creates the optimizer states (GaLore's first SVD), and `measure_step` traces a
steady-state step with the `MemoryTracker`, which counts fake storages exactly as real ones. On
CPU the result equals a real step's byte for byte (tests/lowrank/test_dryrun.py); llama-7b takes
seconds to half a minute per method, and the process stays under half a GiB.

    measured = dry_run("llama-7b", LoRAConfig(rank=64), TrainSetup(batch_size=1, seq_len=256))
    measured.peak_bytes, measured.phase, measured.breakdown

Device. Fake CUDA tensors (CUDA's 512-byte blocks, CUDA kernels' saved tensors) need a PyTorch
built with CUDA: on a CPU-only build, forward works but autograd aborts the process (it looks up
CUDA's device guard), so `device="cuda"` falls back to fake CPU tensors there, with a warning;
`lowrank.device.resolve_device(name, fake=True)` says which one a run gets.

What cannot run on fake tensors, and what the dry run does instead:
  * reading a value (`.item()`, `float(t)`): a float read gives NaN — the loss, a grad norm,
    Q-GaLore's subspace similarity (so its gap never doubles in a dry run); reads of integers
    or booleans (control flow on values) still raise.
  * transformers checks the position ids for packed sequences (a value read); on fake tensors it
    assumes packing and builds an explicit attention mask that a real run skips. The batches here
    are plain sequences, so the dry run answers "not packed", as a real run finds. Under
    `setup.packed` the batches carry position_ids that restart per document, built for real by
    estimator/config.py as a representative packed row (documents of PACKED_DOCUMENTS shares): the
    check runs on those real values, and the packed document indices are computed by the same
    operators on the fake position ids, so the block-diagonal mask is measured as a real run builds it.
  * bitsandbytes computes its 8-bit code table with `.tolist()` and caches it per process; the
    dry run computes it for real first (1 KiB on CPU), as the first real quantization would.
  * Params4bit cannot wrap a fake tensor: lowrank/qlora.py keeps fake 4-bit codes in a plain
    frozen Parameter that carries the same quant_state (the forward reads nothing else).
  * `Module.to` must swap fake parameters, which fake tensors refuse: the model is cast tensor by
    tensor instead (lowrank/load.py `cast_model`, what a real run does too), and `prepare` skips
    a cast that changes nothing. The fake model starts in the dtype a real run builds or loads it
    in, so the load (building, casting, moving, preparing) is measured beside the step.
  * not a workaround but a shortcut: Q-GaLore's INT8 code (lowrank/quant.py) works in blocks of
    1M elements that all allocate alike; on fake tensors it traces the first block only (and a
    short last group), the same memory trace without ~6,000 blocks per pass over a 7B model.

`python -m lowrank.train --model MODEL --method METHOD [options] --dry-run` prints the measured
breakdown beside the estimator's prediction for the same device.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from estimator.config import MethodConfig, TrainSetup, representative_packed_positions
from estimator.constants import torch_dtype
from estimator.distributed import rank_setup
from estimator.load import built_dtype
from estimator.profile import fake_mode, fake_packing_answers, make_fake
from estimator.spec import attention_fallback, load_config, load_spec

from .device import FAKE_CUDA_FALLBACK, resolve_device
from .distributed import Parallel
from .load import LoadMemory, place
from .memory import Measured
from .methods import prepare
from .step import measure_steady_step

LR = 1e-3  # any learning rate: no update is computed
_LOCK = threading.Lock()


def fake_model(config, setup: TrainSetup, mode: FakeTensorMode, device: torch.device,
               dtype: str | None = None) -> nn.Module:
    """The causal LM of `config` in `dtype` (default `setup.dtype`), every parameter and buffer a
    fake tensor on `device`.

    Built and cast on meta (no memory, no init work), then each tensor is faked once, so tied
    weights stay tied.
    """
    from transformers import AutoModelForCausalLM

    attn, _ = attention_fallback(config, setup.attn_implementation)  # eager where the family has no SDPA
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.to(torch_dtype(dtype or setup.dtype))  # done while Module.to still works (not on fakes)
    make_fake(model, mode, device)
    return model


def packed_position_ids(setup: TrainSetup) -> torch.Tensor:
    """Real (batch_size, seq_len) position ids of representative packed rows (documents of
    estimator.config.PACKED_DOCUMENTS shares of seq_len, as lowrank/data.py packs them)."""
    row = representative_packed_positions(setup.seq_len)
    return torch.tensor(row).expand(setup.batch_size, -1).contiguous()


def micro_batches(vocab_size: int, setup: TrainSetup, device: torch.device) -> list[dict]:
    """`setup.grad_accum` batches of (batch_size, seq_len) token ids, labels = inputs (as training);
    packed: with representative packed position ids (no attention mask, as lowrank/data.py gives)."""
    out = []
    for _ in range(setup.grad_accum):
        ids = torch.randint(0, vocab_size, (setup.batch_size, setup.seq_len), device=device)
        batch = {"input_ids": ids, "labels": ids}
        if setup.packed:
            batch["position_ids"] = packed_position_ids(setup).to(device)
        out.append(batch)
    return out


@contextlib.contextmanager
def _real_run_answers(packed: torch.Tensor | None = None) -> Iterator[None]:
    """Answer the value reads a real run makes outside the traced tensors (module docstring).

    The transformers patch answers for fake position ids only, so a real model running in
    another thread meanwhile still checks its own; the lock keeps dry runs from nesting it.
    `packed`: the real position ids the fake batches' were built from (packed runs).
    """
    from bitsandbytes import functional as bnb_functional

    with _LOCK:
        if "dynamic" not in bnb_functional.name2qmap:
            bnb_functional.name2qmap["dynamic"] = bnb_functional.create_dynamic_map()
        with fake_packing_answers(packed):
            yield


def dry_run(model: str, method: MethodConfig, setup: TrainSetup, device: str = "cuda",
            grad_clip: float | None = None, trust_remote_code: bool = False, rank: int = 0) -> Measured:
    """Measure one steady-state training step of `model` with `method`, on fake tensors.

    model: a preset, config.json path, model folder or hub id (`estimator.spec.load_config`).
    rank: which rank of a `setup.gpus`-rank job this step is. Ranks differ only under ZeRO-1,
    where each owns other tensors (the estimate is the largest rank's).
    Returns what `measure_step` returns for a real run: peak, phase and breakdown by category,
    and `load_peak_bytes`: the load measured the same way — the model faked in the dtype the
    trainer builds or loads it in, then cast, moved and prepared by the real code (lowrank/load.py;
    only storages on the device count). A model built from its config makes no untied lm_head
    here (transformers builds on meta), which a real CPU build briefly holds for tied models.
    """
    if not 0 <= rank < setup.gpus:
        raise ValueError(f"rank={rank} is not a rank of a {setup.gpus}-GPU job; give 0 to {setup.gpus - 1}")
    fake_device = resolve_device(device, fake=True)
    if device.startswith("cuda") and fake_device.type != "cuda":
        warnings.warn(FAKE_CUDA_FALLBACK, stacklevel=2)
    config = load_config(model, trust_remote_code)
    built = built_dtype(load_spec(model, trust_remote_code))
    mode = fake_mode()
    net = fake_model(config, setup, mode, torch.device("cpu"), dtype=built)  # on the host, as built
    positions = packed_position_ids(rank_setup(setup)) if setup.packed else None
    with _real_run_answers(positions), fake_process_group(setup.gpus, rank), mode:
        parallel = Parallel(setup.shard, setup.gpus, rank, fake_device, fake=True,
                            offload=setup.cpu_offload) if setup.gpus > 1 else None
        with LoadMemory(fake_device, tracker=True) as load:
            load.watch(net)
            # moved whole before FSDP wraps it (a real run lets fully_shard move it block by block)
            prepared = prepare(place(net, method, setup, fake_device), method, setup, lr=LR, grad_clip=grad_clip,
                               parallel=parallel)
        batches = micro_batches(config.vocab_size, rank_setup(setup), fake_device)
        measured = measure_steady_step(prepared, batches, setup)
    measured.load_peak_bytes = load.peak
    return measured


@contextlib.contextmanager
def fake_process_group(world: int, rank: int = 0) -> Iterator[None]:
    """`rank` of a `world`-rank job whose collectives do nothing (torch's fake process group): the
    step runs the real distributed code, alone."""
    if world == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ValueError(f"a dry run of {world} GPUs needs a process of its own (this one is already in a "
                         "process group); run it outside torchrun")
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
