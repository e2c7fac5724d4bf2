"""Per-GPU estimates under DDP, ZeRO-1 and FSDP2 against the dry run of the same job (the real
engines on fake tensors, fake process group), and the GPU counts the estimator answers with."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import replace

import pytest

from estimator.cli import main
from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.distributed import refusal
from estimator.estimate import estimate, estimate_spec
from estimator.gpus import GPU, gpus_needed, max_batch_size, per_gpu_bytes
from estimator.spec import load_spec
from lowrank.dryrun import dry_run

MODEL = "tiny-llama-20m"
METHODS = {
    "full": FullConfig(), "full-8bit": FullConfig(optimizer="adamw8bit"), "lora": LoRAConfig(rank=8),
    "qlora": QLoRAConfig(rank=8), "galore": GaLoreConfig(rank=32),
    "galore-layerwise-8bit": GaLoreConfig(rank=32, optimizer="adamw8bit", layerwise=True),
    "qgalore": QGaLoreConfig(rank=32),
}
CASES = [(name, shard, {}) for name, method in METHODS.items() for shard in ("none", "optimizer", "gradients", "full")
         if refusal(method, shard) is None]
CASES += [("full", "gradients", {"grad_accum": 2}), ("lora", "full", {"grad_checkpointing": True}),
          ("full", "full", {"grad_accum": 2, "grad_checkpointing": True}), ("galore", "optimizer", {"grad_accum": 2})]


def largest_rank(method, setup: TrainSetup) -> int:
    """The dry run's peak of the largest rank: ranks own different tensors under ZeRO-1 only."""
    ranks = range(setup.gpus) if setup.shard == "optimizer" else [0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return max(dry_run(MODEL, method, setup, device="cpu", rank=r).peak_bytes for r in ranks)


@pytest.mark.parametrize("name, shard, extra", CASES, ids=[f"{n}-{s}{'-' + '-'.join(e) if e else ''}"
                                                           for n, s, e in CASES])
def test_the_per_gpu_estimate_is_the_largest_rank_of_the_dry_run(name, shard, extra):
    setup = TrainSetup(batch_size=4, seq_len=64, gpus=2, shard=shard, **extra)
    predicted = estimate(MODEL, METHODS[name], setup, device="cpu").peak_bytes
    assert predicted == pytest.approx(largest_rank(METHODS[name], setup), rel=0.01)


OFFLOAD_CASES = [("full", "gradients", {}), ("full", "full", {}), ("lora", "gradients", {}), ("lora", "full", {}),
                 ("full", "full", {"grad_accum": 2, "grad_checkpointing": True})]


@pytest.mark.parametrize("name, shard, extra", OFFLOAD_CASES, ids=[f"{n}-{s}{'-' + '-'.join(e) if e else ''}"
                                                                   for n, s, e in OFFLOAD_CASES])
def test_cpu_offload_estimates_the_gpu_and_the_host_as_the_dry_run_measures_them(name, shard, extra):
    """--cpu-offload: the GPU's peak without the shards (the full/full middle-block moment is 0.5 MB
    low on this model with or without offload: 1% of the smaller offloaded peak), and the host's
    memory: every shard of parameters, gradients and optimizer states."""
    setup = TrainSetup(batch_size=4, seq_len=64, gpus=2, shard=shard, cpu_offload=True, **extra)
    predicted = estimate(MODEL, METHODS[name], setup, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = dry_run(MODEL, METHODS[name], setup, device="cpu")
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.015)
    assert predicted.breakdown["optimizer"] == measured.breakdown["optimizer"] == 0  # all on the host
    assert predicted.host_bytes == pytest.approx(measured.host_peak_bytes, rel=1e-3)
    for category in ("weights", "adapters", "gradients", "optimizer"):
        assert predicted.host_breakdown[category] == pytest.approx(measured.host_breakdown[category], rel=1e-3)
    without = estimate(MODEL, METHODS[name], replace(setup, cpu_offload=False), device="cpu")
    assert predicted.peak_bytes < without.peak_bytes and without.host_bytes is None


def test_cpu_offload_moves_the_shards_to_the_host_and_the_gpu_keeps_what_it_computes_with():
    spec, method = load_spec("llama-7b"), FullConfig()
    setup = TrainSetup(batch_size=8, seq_len=512, gpus=8, shard="full")
    on_gpu = estimate_spec(spec, method, setup)
    offloaded = estimate_spec(spec, method, replace(setup, cpu_offload=True))
    terms = on_gpu.distributed_terms
    shards = terms["sharded parameters"] + terms["sharded gradients"] + terms["sharded optimizer states"]
    assert offloaded.host_bytes == shards and offloaded.to_dict()["host"]["peak_bytes"] == shards
    assert offloaded.breakdown["optimizer"] == 0 and offloaded.moments["optimizer"]["gradients"] == 0
    assert offloaded.breakdown["activations"] == on_gpu.breakdown["activations"]  # computed alike
    assert offloaded.peak_bytes < on_gpu.peak_bytes - terms["sharded optimizer states"]
    # on CUDA each prefetched gather starts from host-to-device copies of the block's shards
    prefetch = offloaded.moments["backward: a block's prefetch (host-to-device copies)"]
    gather = offloaded.moments["backward: a block's gather"]
    assert sum(prefetch.values()) - sum(gather.values()) == terms["gathered block"] // 8
    assert "prefetch" not in " ".join(estimate_spec(spec, method, replace(setup, cpu_offload=True),
                                                    device="cpu").moments)  # a CPU mesh copies nothing
    assert offloaded.load_bytes < on_gpu.load_bytes  # fully_shard keeps no shard on the GPU


def test_sharding_divides_what_it_shards_and_ddp_adds_its_buckets():
    spec = load_spec("llama-7b")
    one = estimate_spec(spec, FullConfig(), TrainSetup(batch_size=1, seq_len=256))
    at = {shard: estimate_spec(spec, FullConfig(), TrainSetup(batch_size=8, seq_len=256, gpus=8, shard=shard))
          for shard in ("none", "optimizer", "gradients", "full")}
    assert at["none"].breakdown["optimizer"] == one.breakdown["optimizer"]
    assert at["optimizer"].breakdown["optimizer"] == pytest.approx(one.breakdown["optimizer"] / 8, rel=0.05)
    assert at["gradients"].peak_bytes < at["optimizer"].peak_bytes < at["none"].peak_bytes
    assert at["full"].peak_bytes < at["gradients"].peak_bytes
    assert at["full"].breakdown["weights"] < one.breakdown["weights"] / 4  # sharded, plus a block or two gathered


def test_the_gpus_needed_are_the_fewest_that_fit():
    spec, method = load_spec("llama2-13b"), FullConfig()
    setup = TrainSetup(batch_size=2, seq_len=512, gpus=2, shard="full")
    need = per_gpu_bytes(spec, method, setup)
    gpu = GPU("test 40 GiB", 40 * 1024, "datacenter")
    n = gpus_needed(spec, method, setup, gpu)
    assert n is not None and n > 2
    assert need(n) <= gpu.memory_bytes < need(n - 1)
    assert all(need(k) >= need(k + 1) for k in range(2, 64))  # per-GPU memory falls as GPUs are added
    tiny = GPU("test 1 GiB", 1024, "consumer")
    assert gpus_needed(spec, method, setup, tiny) is None  # a block gathered alone does not fit
    ddp = TrainSetup(batch_size=2, seq_len=512, gpus=2, shard="none")
    assert gpus_needed(spec, method, ddp, GPU("huge", 10**7, "datacenter")) == 1
    assert gpus_needed(spec, method, ddp, gpu) is None  # replicated: more GPUs never help


def test_the_largest_batch_is_per_gpu_at_the_gpu_count():
    spec, method = load_spec("llama-7b"), LoRAConfig(rank=16)
    gpu = GPU("test 80 GiB", 80 * 1024, "datacenter")
    setup = TrainSetup(batch_size=4, seq_len=1024, gpus=4, shard="full")
    largest = max_batch_size(spec, method, setup, gpu)
    fits = lambda b: estimate_spec(spec, method, TrainSetup(batch_size=4 * b, seq_len=1024, gpus=4,  # noqa: E731
                                                            shard="full")).total_bytes <= gpu.memory_bytes
    assert largest and fits(largest) and not fits(largest + 1)


def test_the_cli_answers_per_gpu_with_the_gpus_each_needs(capsys):
    assert main(["llama2-70b", "--method", "lora", "--batch-size", "8", "--gpus", "8", "--shard", "full",
                 "--fit-table", "--max-batch-size", "H100 80GB"]) == 0
    out = capsys.readouterr().out
    assert "per GPU of 8 (batch 1 each), shard full" in out.splitlines()[0]
    assert "needs (shard full)" in out and "H100 80GB (79.6 GiB): batch size up to" in out


@pytest.mark.parametrize("args, words", [
    (["--method", "galore", "--batch-size", "2", "--gpus", "2", "--shard", "full"], "use --shard optimizer"),
    (["--method", "lora", "--batch-size", "3", "--gpus", "2"], "not divisible by --gpus 2"),
    (["--method", "lora", "--shard", "full"], "give --gpus 2 or more"),
    (["--method", "full", "--batch-size", "2", "--gpus", "2", "--shard", "optimizer", "--cpu-offload"],
     "and --shard 'optimizer' has none (ZeRO-1): give --shard 'gradients' or 'full'"),
    (["--method", "lora", "--cpu-offload"], "and --shard 'none' has none (DDP)"),
])
def test_a_strategy_that_cannot_work_is_one_line_and_status_2(args, words):
    done = subprocess.run([sys.executable, "-m", "estimator", "llama-7b", *args], capture_output=True, text=True)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert words in line and "Traceback" not in done.stderr
