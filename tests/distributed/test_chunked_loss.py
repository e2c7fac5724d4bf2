"""The chunked loss under data parallelism, on 2 CPU processes (torchrun, Gloo)."""

from __future__ import annotations

import json

import pytest

from tests.distributed.test_distributed import torchrun


def test_the_chunked_loss_on_two_ranks_equals_one_process_with_the_full_loss():
    done = torchrun("-m", "tests.distributed.chunked_loss")
    assert done.returncode == 0, done.stderr[-3000:]
    cases = {(r["method"], r["shard"]): r for r in map(json.loads, done.stdout.splitlines())}
    assert set(cases) == {("full", "none"), ("full", "optimizer"), ("full", "gradients"), ("full", "full"),
                          ("lora", "full")}
    for key, case in cases.items():
        assert not case["beyond"], (key, case["beyond"])
        assert case["losses"] == pytest.approx(case["reference_losses"], rel=1e-5), key
