"""Fault injection: a run stopped, killed at a random step or killed in the middle of writing its
checkpoint resumes to the very losses of an uninterrupted run; an out-of-memory error ends it
"failed" with the predicted peak and the device's capacity, and what it wrote stays."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
RUN = ["--model", "tiny-llama-5m", "--method", "galore", "--rank", "8", "--update-proj-gap", "3",
       "--batch-size", "2", "--seq-len", "32", "--steps", str(STEPS), "--eval-every", "0", "--no-progress",
       "--checkpoint-minutes", "1e-9"]  # a resume checkpoint after every step


def launch(out: Path, *extra: str, script: str | None = None) -> subprocess.Popen:
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "lowrank.train"]
    return subprocess.Popen([*head, *RUN, "--out", str(out), *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def resume(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank.train", "--resume", str(out), "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, len(lines) + 1))  # each step once, in order
    return [line["loss"] for line in lines]


def steps_written(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def interrupt_at(process: subprocess.Popen, out: Path, step: int, sig: signal.Signals) -> None:
    deadline = time.monotonic() + 300
    while steps_written(out) < step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    process.wait(60)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("faults") / "straight"
    process = launch(out)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return losses(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_interrupted_at_a_random_step_then_resumed_gives_the_same_losses(tmp_path, straight, sig):
    step = random.Random(f"{sig.name}-{STEPS}").randint(2, STEPS - 2)
    out = tmp_path / "run"
    interrupt_at(launch(out), out, step, sig)
    summary = out / "summary.json"
    if sig == signal.SIGTERM:  # the step in progress finishes, the run ends "stopped" with a checkpoint
        assert json.loads(summary.read_text())["status"] == "stopped"
    else:
        assert not summary.exists()
    done = resume(out)
    assert done.returncode == 0, done.stderr
    assert json.loads(summary.read_text())["status"] == "completed"
    assert losses(out) == straight


KILL_WHILE_SAVING = """
import os, signal, sys
import torch
from lowrank import checkpoints, train
saved = 0
real_save = torch.save
def save_then_die(obj, path, *args, **kwargs):
    global saved
    saved += 1
    if saved == 4:  # the 4th checkpoint: half a file, then the power goes
        with open(path, "wb") as f:
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, path, *args, **kwargs)
checkpoints.torch.save = save_then_die
sys.exit(train.main(sys.argv[1:]))
"""


def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path, straight):
    out = tmp_path / "run"
    process = launch(out, script=KILL_WHILE_SAVING)
    process.wait(300)
    assert process.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "checkpoint.pt.tmp").exists()  # the half-written file never replaced the last one
    done = resume(out)
    assert done.returncode == 0, done.stderr
    assert losses(out) == straight


def test_out_of_memory_in_a_step_fails_the_run_with_the_prediction_and_keeps_what_was_written(tmp_path, monkeypatch,
                                                                                                capsys):
    from lowrank import recipe, train

    real_step = recipe.training_step

    def running_out_at_step_3(prepared, batches, setup, tracker=None):
        if steps_written(tmp_path / "oom") == 2:
            raise MemoryError("simulated: the allocator found no memory")
        return real_step(prepared, batches, setup, tracker)

    monkeypatch.setattr(recipe, "training_step", running_out_at_step_3)
    assert train.main([*RUN, "--out", str(tmp_path / "oom")]) == train.EXIT_OOM
    err = capsys.readouterr().err.strip().splitlines()
    summary = json.loads((tmp_path / "oom" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["final"]["steps"] == 2
    predicted_gib = summary["predicted"]["peak_bytes"] + summary["predicted"]["overhead_bytes"]
    assert f"predicted a peak of {predicted_gib / 2**30:.2f} GiB" in summary["message"]
    assert f"holds {summary['device_capacity_bytes'] / 2**30:.2f} GiB" in summary["message"]
    assert len(err) == 1 and "out of memory" in err[0] and "lower --batch-size" in err[0]
    assert [json.loads(line)["step"] for line in (tmp_path / "oom" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
