"""The Train tab's handlers as plain functions: real CPU runs through the worker, stop, reload, downloads."""

from __future__ import annotations

import dataclasses
import json
import threading
import zipfile
from dataclasses import fields
from pathlib import Path

import pytest

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QLoRAConfig, TrainSetup
from ui.demo import task_records, write_task
from ui.runner import DATA_SOURCES, Runner, data_path, finetune_demo, plan_runs, train_methods
from ui.runs import Board, RunView, export_run, past_runs, render, results_table, view_from_folder

SETUP = TrainSetup(batch_size=2, seq_len=64, dtype="fp32")


def widget_values() -> dict:
    """The Train tab's batch/precision widgets and every method's options, at their defaults."""
    from estimator.config import METHODS

    return {"batch_size": 2, "seq_len": 64, "grad_accum": 1, "dtype": "fp32", "autocast": False,
            "grad_checkpointing": False, "attn_implementation": "sdpa",
            **{f"{m}__{f.name}": f.default for m, cls in METHODS.items() for f in fields(cls)}}


def run_all(events) -> list[dict]:
    return list(events)


def test_methods_run_one_after_another_and_end_predicted_beside_measured(tmp_path):
    runner, board = Runner(tmp_path), Board()
    events = run_all(train_methods(runner, "s", board, "tiny-llama-5m", [LoRAConfig(rank=4), GaLoreConfig(rank=16,
                     update_proj_gap=1)], SETUP, steps=3, lr=None, data=None, eval_every=3, seed=0, device="cpu"))
    assert [e["type"] for e in events] == ["started", "step", "step", "step", "summary"] * 2
    assert [v.status for v in board.runs] == ["completed", "completed"]
    assert board.status.startswith("Done: 2 of 2")
    status, progress, loss, memory, layers, comparison, table, files = render(board, with_downloads=True)
    assert [t.name for t in loss.data] == ["LoRA", "LoRA (eval)", "GaLore", "GaLore (eval)"]  # the page's labels
    assert len(loss.data[0].y) == 3
    assert {t.name for t in layers.data} == {"GaLore"} and len(layers.data[0].x) == 28
    assert list(comparison.data[0].x[1]) == ["predicted", "measured"] * 2
    rows = table.to_dict("records")
    assert [r["run"] for r in rows] == ["LoRA", "GaLore"]
    assert all(r["error"].endswith("%") and abs(float(r["error"][:-1])) < 5 for r in rows)
    names = sorted(Path(f).name for f in files)
    assert sum(n.endswith("-metrics.csv") for n in names) == 2
    assert sum(n.endswith("-summary.json") for n in names) == 2
    adapter = next(f for f in files if f.endswith("-adapter.zip"))
    assert "adapter_config.json" in zipfile.ZipFile(adapter).namelist()
    # the same runs, reloaded from their folders, look the same
    choices = past_runs(tmp_path)
    assert len(choices) == 2 and all("completed" in label for label, _ in choices)
    again = Board([view_from_folder(out) for _, out in reversed(choices)])
    assert results_table(again)["measured peak"].tolist() == results_table(board)["measured peak"].tolist()
    # the metrics CSV of a live run and of the same run read back from its folder are the same file
    for live, reloaded in zip(board.runs, again.runs):
        csv = next(f for f in export_run(live) if f.endswith("-metrics.csv"))
        written = Path(csv).read_bytes()
        assert next(f for f in export_run(reloaded) if f.endswith("-metrics.csv")) == csv
        assert Path(csv).read_bytes() == written
        assert written.splitlines()[0] == b"step,loss,lr,grad_norm,tokens,tokens_per_s,step_time_s,memory_peak_bytes,eval_loss"


def test_stop_ends_the_run_in_progress_and_skips_the_rest(tmp_path):
    runner, board = Runner(tmp_path), Board()
    events = train_methods(runner, "s", board, "tiny-llama-5m", [FullConfig(), LoRAConfig()], SETUP, steps=500,
                           lr=None, data=None, eval_every=0, seed=0, device="cpu")
    other = Runner(tmp_path)  # another session's Stop does nothing to this one
    for event in events:
        if event["type"] == "step" and event["step"] == 1:
            assert not other.stop("another session")
            threading.Thread(target=runner.stop, args=("s",)).start()
    assert [v.status for v in board.runs] == ["stopped", "skipped (stopped)"]
    assert board.runs[0].metrics and len(board.runs[0].metrics) < 500
    assert board.status.startswith("Stopped")
    assert results_table(board)["status"].tolist() == ["stopped", "skipped (stopped)"]
    assert not runner.stop("s")  # the sequence is over: nothing left to stop


def test_a_page_that_goes_away_ends_its_worker(tmp_path):
    import os

    events = train_methods(Runner(tmp_path), "s", Board(), "tiny-llama-5m", [LoRAConfig()], SETUP, steps=500,
                           lr=None, data=None, eval_every=0, seed=0, device="cpu")
    pid = next(events)["pid"]
    events.close()  # what Gradio does to a generator whose page is closed
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_failed_run_is_reported_and_the_next_one_still_runs(tmp_path):
    runner, board = Runner(tmp_path), Board()
    items = plan_runs(runner, "tiny-llama-5m", [LoRAConfig(), LoRAConfig(rank=2)], SETUP, 2, None, None, 0, 0, "cpu")
    label, spec, predicted = items[0]  # its data file goes away before the worker starts: it refuses
    items[0] = (label, dataclasses.replace(spec, data=str(tmp_path / "gone.txt")), predicted)
    from ui.runner import run_sequence

    list(run_sequence(runner, "s", board, items))
    assert [v.status for v in board.runs] == ["failed", "completed"]
    assert "gone.txt' does not exist" in board.runs[0].message
    assert results_table(board)["status"].tolist() == ["failed", "completed"]


def test_bad_choices_are_refused_before_any_worker_starts(tmp_path):
    runner = Runner(tmp_path)
    with pytest.raises(ValueError, match="model is empty"):
        plan_runs(runner, " ", [LoRAConfig()], SETUP, 2, None, None, 0, 0, "cpu")
    with pytest.raises(ValueError, match="rank=512 is above"):
        plan_runs(runner, "tiny-llama-5m", [LoRAConfig(rank=512)], SETUP, 2, None, None, 0, 0, "cpu")
    with pytest.raises(ValueError, match="more than this device's"):
        plan_runs(runner, "llama2-70b", [FullConfig()], SETUP, 2, None, None, 0, 0, "cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        plan_runs(runner, "tiny-llama-5m", [LoRAConfig()], SETUP, 2, None, None, 0, 0, "tpu")
    assert not any(tmp_path.iterdir())


def test_data_choices(tmp_path):
    assert data_path(DATA_SOURCES[0], None, tmp_path) is None
    task = Path(data_path(DATA_SOURCES[1], None, tmp_path))
    records = [json.loads(line) for line in task.read_text().splitlines()]
    assert len(records) > 100 and records == task_records()
    upload = tmp_path / "notes.txt"
    upload.write_text("some text " * 100)
    kept = Path(data_path(DATA_SOURCES[2], str(upload), tmp_path))
    assert kept.parent == tmp_path / ".data" and kept.read_text() == upload.read_text()
    with pytest.raises(ValueError, match="no data file uploaded"):
        data_path(DATA_SOURCES[2], None, tmp_path)
    bad = tmp_path / "data.csv"
    bad.write_text("a,b")
    with pytest.raises(ValueError, match=r"\.txt .* or \.jsonl"):
        data_path(DATA_SOURCES[2], str(bad), tmp_path)


def test_the_task_asks_for_function_bodies():
    records = task_records()
    assert len(records) > 500
    assert all(r["prompt"].startswith("def ") and r["response"].startswith("    ") for r in records)

def test_the_fine_tuning_demo_fine_tunes_the_base_it_pre_trained(tmp_path):
    runner, board = Runner(tmp_path), Board()
    run_all(finetune_demo(runner, "s", board, "tiny-llama-5m", 3, 2, [QLoRAConfig(rank=4)], SETUP, lr=None,
                          eval_every=0, seed=0, device="cpu"))
    pre, ft = board.runs
    assert (pre.label, pre.status, ft.label, ft.status) == ("pre-training (Full training)", "completed",
                                                            "QLoRA (fine-tune)", "completed")
    config = json.loads((Path(ft.out) / "config.json").read_text())
    assert config["model"] == str(Path(pre.out) / "final")
    assert config["run"]["data"] == str(write_task(tmp_path / ".data"))


def test_a_run_without_a_summary_reloads_as_interrupted(tmp_path):
    out = tmp_path / "20250101-000000-tiny-lora"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "tiny-llama-5m", "method": {"method": "lora"},
                                                 "run": {"steps": 10}}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 8.0, "memory_peak_bytes": 1000,
                                                   "tokens_per_s": 5.0}) + "\n")
    view = view_from_folder(out)
    assert (view.status, view.method, view.steps, len(view.metrics)) == ("interrupted", "lora", 10, 1)
    assert [Path(f).name for f in export_run(view)] == [f"{out.name}-metrics.csv"]
    row = results_table(Board([view])).iloc[0]
    assert (row["final loss"], row["measured peak"]) == ("8.0000", "—")


def test_board_folds_worker_events():
    board, view = Board(), RunView("lora", "lora", "/nowhere")
    board.add(view)
    board.apply(view, {"type": "started"})
    board.apply(view, {"type": "step", "step": 1, "loss": 3.0, "progress": 0.1, "eta_s": 9.0})
    board.apply(view, {"type": "step", "step": "2", "loss": 3.0})  # no int step: left out
    board.apply(view, {"type": "error", "message": "out of memory", "summary": None})
    assert (view.status, view.message, [m["step"] for m in view.metrics]) == ("failed", "out of memory", [1])
    line = view.metrics[0]
    assert line["loss"] == 3.0 and line["eval_loss"] is None and "progress" not in line and "eta_s" not in line
    # a summary of any shape is folded in without raising
    for summary in ([1, 2, 3], {"final": "x"}, {"status": "completed", "final": {"loss": "abc"}}):
        other = board.add(RunView("x", "lora", "/nowhere"))
        board.apply(other, {"type": "summary", "summary": summary})
        assert results_table(Board([other])).iloc[0]["final loss"] == "—"


def test_the_tab_handlers_turn_bad_widget_values_into_messages(tmp_path):
    import gradio as gr

    from ui.train import TrainHandlers

    values = widget_values()
    handlers = TrainHandlers(Runner(tmp_path))
    with pytest.raises(gr.Error, match="rank=512 is above"):
        next(handlers.start("tiny-llama-5m", ["lora"], DATA_SOURCES[0], None, 5, 0, 0, 0, "cpu",
                            **{**values, "lora__rank": 512}))
    with pytest.raises(gr.Error, match="batch_size=0"):
        next(handlers.start("tiny-llama-5m", ["lora"], DATA_SOURCES[0], None, 5, 0, 0, 0, "cpu",
                            **{**values, "batch_size": 0}))
    with pytest.raises(gr.Error, match="no data file uploaded"):
        next(handlers.start("tiny-llama-5m", ["lora"], DATA_SOURCES[2], None, 5, 0, 0, 0, "cpu", **values))
    with pytest.raises(gr.Error, match="tick at least one"):
        next(handlers.start_demo("tiny-llama-5m", 10, 5, [], 0, 0, 0, "cpu", **values))
    with pytest.raises(gr.Error, match="steps is empty; give a whole number ≥ 1"):  # an emptied number input
        next(handlers.start("tiny-llama-5m", ["lora"], DATA_SOURCES[0], None, None, 0, 0, 0, "cpu", **values))
    with pytest.raises(gr.Error, match=r"fine-tuning steps=2\.5 must be a whole number"):
        next(handlers.start_demo("tiny-llama-5m", 10, 2.5, ["lora"], 0, 0, 0, "cpu", **values))
    with pytest.raises(gr.Error, match="pick one or more past runs"):
        handlers.show([])
    assert not list(tmp_path.glob("*/config.json"))  # no worker was started


def test_a_stop_while_queued_cancels_the_runs_before_they_start(tmp_path):
    """Start waits in the device queue behind another page's run; Stop then cancels it, and the
    page's next Start is not affected."""
    import gradio as gr

    from ui.train import TrainHandlers, session_of

    values = widget_values()
    runner = Runner(tmp_path)
    handlers = TrainHandlers(runner)
    session = session_of(None)
    handlers.queue()
    assert runner.is_queued(session)
    with pytest.MonkeyPatch.context() as patch:
        infos = []
        patch.setattr(gr, "Info", infos.append)
        handlers.stop()
    assert infos == ["Cancelled: the queued runs will not start."]
    outputs = list(handlers.start("tiny-llama-5m", ["lora", "galore"], DATA_SOURCES[0], None, 2, 0, 0, 0, "cpu",
                                  **values))
    assert len(outputs) == 1 and "Stopped: 0 of 2 runs completed" in outputs[-1][0]
    assert not list(tmp_path.glob("*/config.json"))  # no worker was started
    assert not runner.is_queued(session) and not runner.stop(session)

    handlers.queue()  # the next Start runs
    board_text = list(handlers.start("tiny-llama-5m", ["lora"], DATA_SOURCES[0], None, 2, 0, 0, 0, "cpu",
                                     **values))[-1][0]
    assert "Done: 1 of 1 runs completed" in board_text


def test_a_failed_run_closes_with_what_failed_and_why(tmp_path):
    from ui.runner import closing_line

    failed = RunView("LoRA", "lora", str(tmp_path), status="failed",
                     message="out of memory on cpu: the estimator predicted a peak of 1.00 GiB")
    line = closing_line(Board([failed]), stopped=False)
    assert line.startswith("Done: 0 of 1 runs completed — **LoRA** failed: out of memory on cpu")
    assert "Predicted vs measured" not in line and "downloads" not in line  # nothing of the kind below
    done = RunView("GaLore", "galore", str(tmp_path), status="completed", metrics=[{"step": 1}],
                   predicted={"peak_bytes": 1, "breakdown": {}},
                   summary={"measured": {"peak_bytes": 1, "breakdown": {}}})
    line = closing_line(Board([failed, done]), stopped=False)
    assert line.startswith("Done: 1 of 2 runs completed — **LoRA** failed: out of memory")
    assert line.endswith("Predicted vs measured memory below; downloads at the bottom.")


def fake_follow(clock: list[float], startup: float, step_times: list[float], end: float):
    """Runner.follow's events for a run whose steps take `step_times`, moving the fake `clock`."""
    def follow(self, spec, session, poll=0.25):
        yield {"type": "started", "out": spec.out, "pid": 0, "steps": spec.steps, "method": spec.method.method}
        clock[0] += startup
        for step, seconds in enumerate(step_times, 1):
            clock[0] += seconds
            yield {"type": "step", "step": step, "loss": 5.0, "step_time_s": seconds, "progress": step / spec.steps,
                   "eta_s": seconds * (spec.steps - step)}
        clock[0] += end
        yield {"type": "summary", "summary": {"status": "completed", "message": "", "final": {"steps": spec.steps}}}
    return follow


def seconds_of(text: str) -> float:
    """'2 min 37 s' -> 157"""
    import re

    minutes = re.search(r"(\d+) min", text)
    return (60 * int(minutes.group(1)) if minutes else 0) + int(re.search(r"(\d+) s$", text).group(1))


def test_the_time_left_for_all_runs_is_steady_and_says_when_a_run_starts(tmp_path, monkeypatch):
    """Step times that swing between 0.1 s and 1.9 s (and a 20 s start per run) move the estimate
    for all runs little: it comes from the mean step time and start of every run so far."""
    import re

    from ui.runner import Pace, run_sequence

    clock = [0.0]
    steps = 30
    step_times = [0.1 if step % 2 else 1.9 for step in range(steps)]
    monkeypatch.setattr(Runner, "follow", fake_follow(clock, startup=20.0, step_times=step_times, end=5.0))
    runner, board = Runner(tmp_path), Board()
    items = plan_runs(runner, "tiny-llama-5m", [LoRAConfig(), GaLoreConfig(rank=16), FullConfig()], SETUP, steps,
                      None, None, 0, 0, "cpu")
    truth = 3 * (20.0 + sum(step_times) + 5.0)  # when the last run ends
    ends, texts = [], []
    for event in run_sequence(runner, "s", board, items, Pace(lambda: clock[0])):
        texts.append((event["type"], board.progress_text))
        found = re.search(r"about (.+) for all", board.progress_text)
        if found:
            ends.append(clock[0] + seconds_of(found.group(1)))  # the predicted end of the last run
    assert [v.status for v in board.runs] == ["completed"] * 3
    # once the first run's start and a few steps are known, the predicted end stays within 10% of the truth
    # and never moves by more than 5% of it from one update to the next (one step's time × steps swung 10×)
    settled = ends[5:]
    assert len(settled) > 50
    assert all(abs(end - truth) < 0.1 * truth for end in settled), (truth, settled)
    assert all(abs(b - a) < 0.05 * truth for a, b in zip(settled, settled[1:]))
    # between runs: "starting …", never the last run's "step 30/30"
    started = [text for kind, text in texts if kind == "started"]
    assert started[0] == "starting LoRA (1/3)…"
    assert started[1].startswith("starting GaLore (2/3)…, about") and started[2].startswith("starting Full training (3/3)…")
    last_steps = [text for kind, text in texts if kind == "step" and f"step {steps}/{steps}" in text]
    assert all("finishing" in text for text in last_steps)


def test_a_worker_killed_under_the_app_fails_its_run_and_the_app_keeps_serving(tmp_path, served_app):
    import os
    import signal

    from gradio_client import Client

    from ui.train import TrainHandlers

    runner, board = Runner(tmp_path), Board()
    handlers = TrainHandlers(runner)
    events = []
    for event in train_methods(runner, "s", board, "tiny-llama-5m", [LoRAConfig(rank=4)], SETUP, steps=500,
                               lr=None, data=None, eval_every=0, seed=0, device="cpu"):
        events.append(event)
        if event["type"] == "step" and event["step"] == 1:
            out = board.runs[0].out  # a run in progress cannot be deleted from the page
            _, _, _, message = handlers.delete([out], True)
            assert "not deleted" in message and "using it" in message and Path(out, "config.json").exists()
            os.kill(events[0]["pid"], signal.SIGKILL)
    view = board.runs[0]
    assert events[-1]["type"] == "error" and view.status == "failed" and "killed" in view.message
    assert "SIGKILL" in board.status and board.status.startswith("Done: 0 of 1 runs completed — **LoRA** failed:")
    assert "Predicted vs measured" not in board.status  # the run never reached its measured step's summary
    assert results_table(board)["status"].tolist() == ["failed"]
    with pytest.warns(UserWarning, match="tick"):  # it asks for a confirmation (gr.Warning outside a page)
        assert handlers.delete([view.out], False)[-1].startswith("Nothing deleted: tick")
    assert Path(view.out, "metrics.jsonl").exists()
    result = Client(served_app[0], verbose=False).predict(model="tiny-llama-5m", method="lora", api_name="/estimate")
    assert result["peak_bytes"] > 0
