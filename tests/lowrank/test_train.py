"""The trainer end to end on CPU: every method, predicted beside measured, resume, stop, kill, bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from lowrank.recipe import RunSpec, learning_rate, train
from lowrank.worker import list_runs, read_run, start_run

REPO = Path(__file__).resolve().parents[2]
SETUP = TrainSetup(batch_size=2, seq_len=64, dtype="bf16")


def run_spec(tmp_path: Path, name: str, method, setup: TrainSetup = SETUP, **overrides) -> RunSpec:
    return RunSpec("tiny-llama-5m", method, setup, out=str(tmp_path / name),
                   **{"steps": 6, "eval_every": 3, "eval_batches": 2, **overrides})


@pytest.mark.parametrize("method", [FullConfig(), LoRAConfig(rank=8), QLoRAConfig(rank=8), GaLoreConfig(rank=16),
                                    GaLoreConfig(rank=16, optimizer="adamw8bit", layerwise=True),
                                    QGaLoreConfig(rank=16)], ids=lambda m: m.method + ("-lw" if getattr(m, "layerwise", 0) else ""))
def test_every_method_end_to_end(tmp_path, method):
    summary = train(run_spec(tmp_path, method.method, method), progress=False)
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
    train(run_spec(tmp_path, "pretrain", FullConfig(), steps=3, eval_every=0), progress=False)
    base = tmp_path / "pretrain" / "final"
    spec = RunSpec(str(base), LoRAConfig(rank=4), SETUP, out=str(tmp_path / "finetune"), steps=3, eval_every=0)
    summary = train(spec, progress=False)
    assert summary["status"] == "completed"
    config = json.loads((tmp_path / "finetune" / "config.json").read_text())
    assert config["data"]["tokenizer"] == str(base)  # the base's own tokenizer, not a new BPE


def test_lora_from_a_preset_saves_its_base_and_peft_loads_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(run_spec(tmp_path, "lora", LoRAConfig(rank=4), steps=4, eval_every=0, save_every=2), progress=False)
    out = tmp_path / "lora"
    assert (out / "checkpoints" / "step-2" / "adapter_model.safetensors").exists()
    assert (out / "checkpoints" / "step-4" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out / "final")
    ids = torch.randint(0, 4096, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_resume_continues_the_same_trajectory(tmp_path, monkeypatch):
    from lowrank import recipe

    method = GaLoreConfig(rank=16, update_proj_gap=3)
    straight = train(run_spec(tmp_path, "straight", method, steps=8, eval_every=0), progress=False)
    schedule = recipe.learning_rate

    def interrupt_after_four(step, peak, spec):  # as SIGTERM would, after the 4th step
        if step == 3:
            recipe.Stop.requested = True
        return schedule(step, peak, spec)

    monkeypatch.setattr(recipe, "learning_rate", interrupt_after_four)
    spec = run_spec(tmp_path, "resumed", method, steps=8, eval_every=0)
    assert train(spec, progress=False)["status"] == "stopped"
    monkeypatch.setattr(recipe, "learning_rate", schedule)
    resumed = train(spec, resume=True, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert resumed["status"] == "completed"
    assert resumed["final"]["loss"] == pytest.approx(straight["final"]["loss"], rel=1e-5)


def test_learning_rate_schedule():
    spec = RunSpec("x", FullConfig(), steps=100, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(0, 1.0, spec) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, spec) == pytest.approx(1.0)
    assert learning_rate(99, 1.0, spec) == pytest.approx(0.1, abs=1e-3)
    assert all(learning_rate(s, 1.0, spec) >= learning_rate(s + 1, 1.0, spec) for s in range(10, 99))


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
    spec = RunSpec("tiny-llama-5m", LoRAConfig(rank=4), SETUP, out=str(tmp_path / "stopped"), steps=200, eval_every=0)
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
    spec = RunSpec("tiny-llama-5m", FullConfig(), SETUP, out=str(tmp_path / "killed"), steps=500, eval_every=0)
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
    spec = RunSpec("tiny-llama-5m", LoRAConfig(rank=8), TrainSetup(batch_size=4, seq_len=32), out=str(tmp_path / "sft"),
                   steps=4, eval_every=0, data=str(task))
    summary = train(spec, progress=False)
    assert summary["predicted"]["options"]["padded"] is True
    assert summary["comparison"]["within_targets"], summary["comparison"]


def test_the_spec_and_its_command_line_are_one(tmp_path):
    """Every run option the worker writes is parsed back into the same RunSpec."""
    from lowrank.train import build_parser, spec_from_args

    specs = [RunSpec("tiny-llama-5m", LoRAConfig(rank=4, alpha=8.0), SETUP, out=str(tmp_path), steps=3),
             RunSpec("llama-60m", GaLoreConfig(rank=8, layerwise=True), TrainSetup(grad_accum=2, dtype="fp32",
                     autocast=True), out="x", lr=3e-4, warmup=0, grad_clip=None, eval_every=0, save_every=5,
                     checkpoint_minutes=0.5, seed=7, data="a.jsonl", device="cpu", trust_remote_code=True)]
    for spec in specs:
        assert spec_from_args(build_parser().parse_args(spec.flags())) == spec
        assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_run_folder_files_keep_their_shape(tmp_path):
    """config.json, metrics.jsonl and summary.json as the app, past runs and users read them."""
    train(run_spec(tmp_path, "shape", LoRAConfig(rank=4), steps=2, eval_every=0), progress=False)
    out = tmp_path / "shape"
    config = json.loads((out / "config.json").read_text())
    assert {"model", "method", "setup", "run", "lr", "device", "data", "params", "base_model", "torch"} <= set(config)
    assert config["method"]["method"] == "lora" and config["run"]["steps"] == 2 and config["run"]["out"] == str(out)
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(line) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s",
                         "memory_peak_bytes", "eval_loss"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"status", "message", "model", "method", "device", "gpus", "shard", "measured_ranks",
                            "device_capacity_bytes", "predicted", "measured", "comparison", "final", "load_peak_bytes"}
    assert set(summary["final"]) == {"steps", "loss", "eval_loss", "tokens_per_s", "train_seconds", "final_dir"}
    assert set(summary["comparison"]) == {"peak_error", "category_errors", "within_targets", "failures", "load_error"}
    assert summary["measured"]["load_peak_bytes"] == summary["load_peak_bytes"] > 0
    assert set(summary["predicted"]["load"]) == {"peak_bytes", "moment", "breakdown"}


def test_resume_from_the_command_line_into_the_folder_it_is_given(tmp_path):
    """README's command: `--resume DIR --steps N` needs no --method, writes into DIR (a copy of a run
    stays apart from its original), and takes any --steps, the old default included."""
    import shutil

    first = cli("--model", "tiny-llama-5m", "--method", "lora", "--rank", "4", "--steps", "3", "--batch-size", "2",
                "--seq-len", "32", "--eval-every", "0", "--out", str(tmp_path / "original"), "--no-progress")
    assert first.returncode == 0, first.stderr
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    more = cli("--resume", str(tmp_path / "copy"), "--steps", "200", "--no-progress")
    assert more.returncode == 0, more.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 201))
    assert len((tmp_path / "original" / "metrics.jsonl").read_text().splitlines()) == 3  # untouched
    again = cli("--resume", str(tmp_path / "copy"), "--steps", "50", "--no-progress")  # fewer: nothing to do
    assert again.returncode == 0, again.stderr
    assert "already ran 200 steps (--steps 50): nothing to train; give --steps above 200" in again.stderr
    assert json.loads((tmp_path / "copy" / "summary.json").read_text())["status"] == "completed"
    refused = cli("--resume", str(tmp_path / "copy"), "--rank", "8")
    assert refused.returncode == 2 and "--rank cannot change when resuming" in refused.stderr


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    """A kill after the last checkpoint leaves lines the resumed run writes again: each step once."""
    spec = run_spec(tmp_path, "killed", FullConfig(), steps=5, eval_every=0)
    train(dataclasses.replace(spec, steps=3), progress=False)  # checkpoint at step 3
    with (tmp_path / "killed" / "metrics.jsonl").open("a") as log:  # steps 4 and 5, then the kill
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + json.dumps({"step": 5, "loss": 1.0}) + "\n")
    train(spec, resume=True, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5] and lines[3]["loss"] != 1.0
