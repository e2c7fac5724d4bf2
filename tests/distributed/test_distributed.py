"""Data parallelism on 2 CPU processes (torchrun, Gloo): every method × strategy that can train gives
the parameters of one process on the same tokens; the others are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig
from lowrank.distributed import SHARD_STRATEGIES, refusal

REPO = Path(__file__).resolve().parents[2]


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def equivalence() -> dict[tuple[str, str], dict]:
    done = torchrun("-m", "tests.distributed.equivalence")
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["method"], r["shard"]): r for r in map(json.loads, done.stdout.splitlines())}


def test_every_supported_method_and_strategy_equals_one_process(equivalence):
    from tests.distributed.equivalence import METHODS

    expected = {(name, shard) for name, method in METHODS.items() for shard in SHARD_STRATEGIES
                if refusal(method, shard) is None}
    assert expected <= set(equivalence)
    assert len(expected) == 24  # full ×4 (adamw, sgd) or ×2 (8-bit, adafactor), LoRA ×4, the rest ×2
    for key in expected:
        case = equivalence[key]
        assert not case["beyond"], (key, case["beyond"])
        assert case["losses"] == pytest.approx(case["reference_losses"], rel=1e-5), key


def test_cpu_offload_trains_to_the_parameters_of_one_process():
    """FSDP2 with CPUOffloadPolicy on a CPU mesh (Gloo): full training and LoRA under gradients and
    full, 3 steps on 2 ranks, every parameter offloaded, end where one process ends."""
    done = torchrun("-m", "tests.distributed.equivalence", "full,lora", "gradients,full", "offload")
    assert done.returncode == 0, done.stderr[-3000:]
    cases = {(r["method"], r["shard"]): r for r in map(json.loads, done.stdout.splitlines())}
    assert set(cases) == {(m, s) for m in ("full", "lora") for s in ("gradients", "full")}
    for key, case in cases.items():
        assert case["offload"] and case["offloaded_params"] == case["fsdp_params"] > 0, key  # every fully_shard
        assert not case["beyond"], (key, case["beyond"])
        assert case["losses"] == pytest.approx(case["reference_losses"], rel=1e-5), key


def test_a_rank_training_on_its_own_rows_alone_is_caught(equivalence):
    """The negative control: without the reduction, the comparison fails on nearly every tensor."""
    assert len(equivalence[("full", "unreduced")]["beyond"]) > 10


@pytest.mark.parametrize("method, shard, words", [
    (GaLoreConfig(), "full", "projects whole matrices"),
    (QGaLoreConfig(), "gradients", "projects whole matrices"),
    (QLoRAConfig(), "full", "4-bit weights"),
    (FullConfig(optimizer="adamw8bit"), "gradients", "adamw8bit cannot update"),
])
def test_what_cannot_train_is_refused_with_what_can(method, shard, words):
    reason = refusal(method, shard)
    assert words in reason and "--shard optimizer" in reason
    assert refusal(method, "none") is None and refusal(method, "optimizer") is None
    assert refusal(LoRAConfig(), shard) is None
