"""The trainer end to end on CPU: every method, predicted beside measured, resume, stop, kill, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from lowrank.train import RunConfig, learning_rate, train
from lowrank.worker import RunSpec, list_runs, read_run, start_run

REPO = Path(__file__).resolve().parents[2]
SETUP = TrainSetup(batch_size=2, seq_len=64, dtype="bf16")


def run_cfg(tmp_path: Path, name: str, **overrides) -> RunConfig:
    return RunConfig(model="tiny-llama-5m", out=str(tmp_path / name), **{"steps": 6, "eval_every": 3,
                                                                          "eval_batches": 2, **overrides})


@pytest.mark.parametrize("method", [FullConfig(), LoRAConfig(rank=8), QLoRAConfig(rank=8), GaLoreConfig(rank=16),
                                    GaLoreConfig(rank=16, optimizer="adamw8bit", layerwise=True),
                                    QGaLoreConfig(rank=16)], ids=lambda m: m.method + ("-lw" if getattr(m, "layerwise", 0) else ""))
def test_every_method_end_to_end(tmp_path, method):
    summary = train(run_cfg(tmp_path, method.method), method, SETUP, progress=False)
    out = tmp_path / method.method
    assert summary["status"] == "completed"
    assert summary["comparison"]["within_targets"], summary["comparison"]
    assert json.loads((out / "summary.json").read_text())["measured"]["peak_bytes"] > 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 7))
    assert all(line["memory_peak_bytes"] > 0 and line["tokens_per_s"] > 0 for line in lines)
    assert "eval_loss" in lines[2] and summary["final"]["eval_loss"] is not None
    if isinstance(method, GaLoreConfig):
        assert len(lines[-1]["layers"]["gap"]) == 28  # 4 blocks × 7 projected linears
    final = out / "final"
    assert (final / ("adapter_config.json" if isinstance(method, LoRAConfig) else "config.json")).exists()
    assert (out / "tokenizer" / "tokenizer.json").exists()


def test_a_finished_run_is_a_model_the_next_run_fine_tunes(tmp_path):
    train(run_cfg(tmp_path, "pretrain", steps=3, eval_every=0), FullConfig(), SETUP, progress=False)
    base = tmp_path / "pretrain" / "final"
    cfg = RunConfig(model=str(base), out=str(tmp_path / "finetune"), steps=3, eval_every=0)
    summary = train(cfg, LoRAConfig(rank=4), SETUP, progress=False)
    assert summary["status"] == "completed"
    config = json.loads((tmp_path / "finetune" / "config.json").read_text())
    assert config["data"]["tokenizer"] == str(base)  # the base's own tokenizer, not a new BPE


def test_lora_from_a_preset_saves_its_base_and_peft_loads_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(run_cfg(tmp_path, "lora", steps=4, eval_every=0, save_every=2), LoRAConfig(rank=4), SETUP, progress=False)
    out = tmp_path / "lora"
    assert (out / "checkpoints" / "step-2" / "adapter_model.safetensors").exists()
    assert (out / "checkpoints" / "step-4" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out / "final")
    ids = torch.randint(0, 4096, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_resume_continues_the_same_trajectory(tmp_path, monkeypatch):
    from lowrank import train as trainer

    method = GaLoreConfig(rank=16, update_proj_gap=3)
    straight = train(run_cfg(tmp_path, "straight", steps=8, eval_every=0), method, SETUP, progress=False)
    schedule = trainer.learning_rate

    def interrupt_after_four(step, peak, cfg):  # as SIGTERM would, after the 4th step
        if step == 3:
            trainer.Stop.requested = True
        return schedule(step, peak, cfg)

    monkeypatch.setattr(trainer, "learning_rate", interrupt_after_four)
    cfg = run_cfg(tmp_path, "resumed", steps=8, eval_every=0)
    assert train(cfg, method, SETUP, progress=False)["status"] == "stopped"
    monkeypatch.setattr(trainer, "learning_rate", schedule)
    resumed = train(cfg, method, SETUP, resume=True, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert resumed["status"] == "completed"
    assert resumed["final"]["loss"] == pytest.approx(straight["final"]["loss"], rel=1e-5)


def test_learning_rate_schedule():
    cfg = RunConfig(model="x", out="y", steps=100, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(0, 1.0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, cfg) == pytest.approx(1.0)
    assert learning_rate(99, 1.0, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(learning_rate(s, 1.0, cfg) >= learning_rate(s + 1, 1.0, cfg) for s in range(10, 99))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("extra,message", [
    (["--data", "/no/such/file.txt"], "no/such/file.txt"),
    (["--data", "EMPTY"], "empty"),
    (["--seq-len", "5000"], "--seq-len 5000 is above tiny-llama-5m's maximum position 1024"),
    (["--batch-size", "0"], "--batch-size 0 must be"),
    (["--method", "dora"], "invalid choice"),
    (["--rank", "999"], "--rank 999 is above"),
])
def test_bad_input_fails_before_any_work(tmp_path, extra, message):
    if "EMPTY" in extra:
        empty = tmp_path / "empty.txt"
        empty.write_text("")
        extra = [str(empty) if x == "EMPTY" else x for x in extra]
    args = ["--model", "tiny-llama-5m", "--method", "lora", "--steps", "2", "--out", str(tmp_path / "run")]
    result = cli(*args, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_worker_events_stop_and_past_runs(tmp_path):
    spec = RunSpec("tiny-llama-5m", LoRAConfig(rank=4), SETUP, out=tmp_path / "stopped", steps=200, eval_every=0)
    run = start_run(spec)
    events = []
    for event in run.events(poll=0.1):
        events.append(event)
        if event["type"] == "step" and event["step"] == 3:
            run.stop()
    assert events[0]["type"] == "started" and events[-1]["type"] == "stopped"
    steps = [e for e in events if e["type"] == "step"]
    assert steps and all(0 < e["progress"] <= 1 and e["eta_s"] >= 0 for e in steps)
    assert events[-1]["summary"]["status"] == "stopped"
    saved = read_run(tmp_path / "stopped")
    assert len(saved["metrics"]) == len(steps) and saved["summary"]["status"] == "stopped"
    assert list_runs(tmp_path)[0]["status"] == "stopped"


def test_a_killed_worker_leaves_its_metrics_and_becomes_an_error_event(tmp_path):
    spec = RunSpec("tiny-llama-5m", FullConfig(), SETUP, out=tmp_path / "killed", steps=500, eval_every=0)
    run = start_run(spec)
    events = []
    for event in run.events(poll=0.1):
        events.append(event)
        if event["type"] == "step" and event["step"] == 2:
            run.kill()
    error = events[-1]
    assert error["type"] == "error" and "killed" in error["message"]
    assert error["predicted_peak_bytes"] > 0 and error["capacity_bytes"] > 0
    assert len(read_run(tmp_path / "killed")["metrics"]) >= 2


def test_jsonl_runs_are_predicted_as_padded(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?\n",
                                        "response": f"It is {2 * i}."}) + "\n" for i in range(40)))
    cfg = RunConfig(model="tiny-llama-5m", out=str(tmp_path / "sft"), steps=4, eval_every=0, data=str(task))
    summary = train(cfg, LoRAConfig(rank=8), TrainSetup(batch_size=4, seq_len=32), progress=False)
    assert summary["predicted"]["options"]["padded"] is True
    assert summary["comparison"]["within_targets"], summary["comparison"]
