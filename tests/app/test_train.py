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
    assert [t.name for t in loss.data] == ["lora", "lora (eval)", "galore", "galore (eval)"]
    assert len(loss.data[0].y) == 3
    assert {t.name for t in layers.data} == {"galore"} and len(layers.data[0].x) == 28
    assert list(comparison.data[0].x[1]) == ["predicted", "measured"] * 2
    rows = table.to_dict("records")
    assert [r["run"] for r in rows] == ["lora", "galore"]
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
    assert (pre.label, pre.status, ft.label, ft.status) == ("pre-train (full)", "completed", "qlora (fine-tune)",
                                                            "completed")
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
    board.apply(view, {"type": "step", "step": 1, "loss": 3.0})
    board.apply(view, {"type": "error", "message": "out of memory", "summary": None})
    assert (view.status, view.message, view.metrics) == ("failed", "out of memory", [{"step": 1, "loss": 3.0}])


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
