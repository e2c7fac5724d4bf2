"""`torchrun --nproc-per-node 2 -m lowrank.train ...` end to end on CPU (Gloo): the run folder of a
2-rank job — per-rank measurements, a checkpoint that resumes on 2 ranks and on 1, a PEFT adapter
equal to one process's — and a rank that fails ends the run "failed" with its own message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
RUN = ["--model", "tiny-llama-5m", "--rank", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
       "--no-progress", "--lr", "1e-3", "--dtype", "fp32"]  # fp32: ranks agree to float rounding


def train(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else [
        sys.executable]
    target = [] if args and args[0].endswith(".py") else ["-m", "lowrank.train"]
    return subprocess.run([*head, *target, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def metrics(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, len(lines) + 1))
    return lines


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: LoRA in one process, batch 4, on the same schedule as the sharded run (4
    steps, resumed to 5, then to 6: the learning rate's schedule follows --steps)."""
    out = tmp_path_factory.mktemp("dist-cli") / "one"
    done = train(*RUN, "--method", "lora", "--steps", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    for steps in ("5", "6"):
        done = train("--resume", str(out), "--steps", steps, "--no-progress")
        assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    """LoRA on 2 ranks under FSDP2 (shard full), batch 2 each: 4 steps (its folder, summary, metrics)."""
    out = tmp_path_factory.mktemp("dist-cli") / "sharded"
    done = train(*RUN, "--method", "lora", "--shard", "full", "--steps", "4", "--out", str(out), ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text()), metrics(out)


@pytest.fixture(scope="module")
def resumed(sharded) -> Path:
    """That run resumed to step 5 on 2 ranks, then to step 6 in one process."""
    out = sharded[0]
    done = train("--resume", str(out), "--steps", "5", "--no-progress", ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    done = train("--resume", str(out), "--gpus", "1", "--steps", "6", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_a_two_rank_run_records_every_rank_and_the_prediction_per_gpu(sharded):
    _, summary, lines = sharded
    assert summary["status"] == "completed" and summary["gpus"] == 2 and summary["shard"] == "full"
    ranks = summary["measured_ranks"]
    assert len(ranks) == 2 and all(r["peak_bytes"] > 0 for r in ranks)  # in rank order
    assert summary["measured"]["peak_bytes"] == max(r["peak_bytes"] for r in ranks)
    assert summary["predicted"]["peak_bytes"] == pytest.approx(summary["measured"]["peak_bytes"], rel=0.05)
    assert len(lines) == 4 and all(line["tokens"] == 128 * line["step"] for line in lines)  # both ranks' tokens


def test_the_checkpoint_of_two_ranks_resumes_on_two_and_on_one_as_one_process_ran(resumed, one_process):
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["gpus"] == 1
    reference = [line["loss"] for line in metrics(one_process)]
    assert [line["loss"] for line in metrics(resumed)] == pytest.approx(reference, rel=1e-4)


def test_the_adapter_of_two_ranks_is_the_peft_adapter_one_process_trains(resumed, one_process):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ours = load_file(one_process / "final" / "adapter_model.safetensors")
    theirs = load_file(resumed / "final" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=2e-3, atol=2e-4)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resumed / "base"), resumed / "final")
    assert torch.isfinite(model(input_ids=torch.randint(0, 4096, (1, 8))).logits).all()


def test_a_cpu_offload_run_measures_each_ranks_gpu_and_host_memory_apart(tmp_path):
    """--cpu-offload under torchrun: the run records the host memory (the offloaded shards) apart from
    the peak, on every rank, as predicted."""
    out = tmp_path / "offload"
    done = train(*RUN, "--method", "lora", "--shard", "full", "--cpu-offload", "--steps", "2", "--out", str(out),
                 ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    predicted, ranks = summary["predicted"], summary["measured_ranks"]
    assert summary["status"] == "completed" and predicted["options"]["cpu_offload"] is True
    assert predicted["host"]["peak_bytes"] == pytest.approx(max(r["host"]["peak_bytes"] for r in ranks), rel=1e-3)
    assert predicted["peak_bytes"] == pytest.approx(summary["measured"]["peak_bytes"], rel=0.05)
    assert all(r["breakdown"]["adapters"] == r["breakdown"]["optimizer"] == 0 for r in ranks)  # on the host


def test_two_nodes_through_torchruns_rendezvous_train_as_one_process(tmp_path, one_process):
    """Multi-node with torchrun's own flags: two launches on this machine, one rank each (--nnodes 2,
    --node-rank 0/1, the master's address and port), form one job whose losses are one process's."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = tmp_path / "nodes"
    args = [*RUN, "--method", "lora", "--steps", "4", "--out", str(out)]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "lowrank.train", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["measured_ranks"]) == 2
    reference = [line["loss"] for line in metrics(one_process)][:4]
    assert [line["loss"] for line in metrics(out)] == pytest.approx(reference, rel=1e-4)


def test_a_rank_that_fails_ends_the_run_failed_with_its_message(tmp_path):
    out = tmp_path / "failing"
    done = train(str(REPO / "tests" / "distributed" / "failing_rank.py"), *RUN, "--method", "galore",
                 "--shard", "optimizer", "--steps", "6", "--out", str(out), ranks=2)
    assert done.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["message"] == "rank 1: RuntimeError: injected fault on rank 1 at its third step"
    assert 1 <= len(metrics(out)) <= 3  # what rank 0 wrote before rank 1 failed stays
    assert "injected fault" in (out / "error-rank-1.txt").read_text()


def test_the_apps_worker_trains_two_ranks_and_stops_them(tmp_path):
    from estimator.config import LoRAConfig, TrainSetup
    from lowrank.recipe import RunSpec
    from lowrank.worker import start_run

    spec = RunSpec("tiny-llama-5m", LoRAConfig(rank=4), TrainSetup(batch_size=4, seq_len=32, gpus=2, dtype="fp32"),
                   out=str(tmp_path / "run"), steps=10_000, eval_every=0)
    run = start_run(spec)
    steps = []
    for event in run.events(poll=0.1, timeout=240):
        if event["type"] == "step":
            steps.append(event)
            assert len(event["memory_peak_ranks"]) == 2 and max(event["memory_peak_ranks"]) == event[
                "memory_peak_bytes"]
            if len(steps) == 2:
                run.stop()  # SIGTERM to torchrun, which passes it to both ranks
        elif event["type"] != "started":
            final = event
    assert final["type"] == "stopped", final
    summary = final["summary"]
    assert summary["gpus"] == 2 and len(summary["measured_ranks"]) == 2
    assert (tmp_path / "run" / "checkpoints" / "checkpoint.pt").exists()  # it resumes from here
