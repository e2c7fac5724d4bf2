"""A runs folder that can hold anything: every odd or unreadable run is listed with its reason,
shown without an exception, and can be deleted from the page; nothing outside the folder can."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lowrank.worker import MAX_METRICS_BYTES, list_runs, read_run
from ui.runner import Runner
from ui.runs import Board, delete_runs, past_runs, render, results_table, view_from_folder
from ui.train import TrainHandlers

CONFIG = {"model": "tiny-llama-5m", "method": {"method": "qgalore"}, "run": {"steps": 3}}
SUMMARY = {"status": "completed", "message": "", "final": {"steps": 3, "loss": 4.5, "eval_loss": 4.6}}
LINE = {"step": 1, "loss": 5.0, "lr": 0.001, "grad_norm": 1.0, "tokens": 128, "tokens_per_s": 100.0,
        "step_time_s": 0.5, "memory_peak_bytes": 1000}


def run_folder(root: Path, name: str, config=CONFIG, summary=SUMMARY, metrics: bytes | None = None) -> Path:
    out = root / name
    out.mkdir()
    for file, data in (("config.json", config), ("summary.json", summary)):
        if data is not None:
            (out / file).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    lines = b"".join(json.dumps({**LINE, "step": step}).encode() + b"\n" for step in (1, 2, 3))
    (out / "metrics.jsonl").write_bytes(lines if metrics is None else metrics)
    return out


@pytest.fixture
def odd_root(tmp_path) -> Path:
    """A runs folder with one good run and one of each oddity."""
    root = tmp_path / "runs"
    root.mkdir()
    run_folder(root, "good")
    run_folder(root, "summary-list", summary=[1, 2, 3])
    run_folder(root, "summary-final-text", summary={"final": "x"})
    run_folder(root, "loss-not-a-number", summary={"status": "completed", "final": {"loss": "abc"}})
    run_folder(root, "binary-metrics", metrics=bytes(range(256)) * 40)
    bad_line = json.dumps({**LINE, "step": 1}) + "\n{not json\n" + json.dumps({**LINE, "step": 3, "loss": "x"}) + "\n"
    run_folder(root, "bad-metrics-line", metrics=bad_line.encode())
    run_folder(root, "config-not-json", config=b"{'model': tiny")
    run_folder(root, "wrong-types", config={"model": 5, "method": {"method": "lora"}, "run": {"steps": "many"}},
               summary={"status": "completed", "predicted": {"peak_bytes": "big", "breakdown": [1]},
                        "measured": [], "comparison": {"peak_error": "x"}, "final": {"steps": 2.5, "tokens_per_s": True}},
               metrics=b'{"step": 1, "loss": 5, "layers": {"names": [1], "gap": "x"}}\n{"step": true}\n[1]\n')
    (root / "a-file").write_text("not a run")
    huge = run_folder(root, "huge-metrics")
    with (huge / "metrics.jsonl").open("wb") as f:  # sparse: no disk used
        f.truncate(MAX_METRICS_BYTES + 1)
    outside = tmp_path / "outside"
    run_folder(tmp_path, "outside")
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "empty").mkdir()
    (root / ".data").mkdir()  # the runs' data: not a run
    model = root / "a-model"  # a model folder kept beside the runs: not a run
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def statuses(root: Path) -> dict[str, str]:
    return {row["name"]: row["status"] for row in list_runs(root)}


def test_every_odd_run_is_listed_with_its_reason(odd_root):
    found = statuses(odd_root)
    assert found == {
        "good": "completed",
        "summary-list": "unreadable: summary.json holds a list, not a JSON object",
        "summary-final-text": 'unreadable: summary.json has no "status" (text)',
        "loss-not-a-number": "completed",
        "binary-metrics": "completed",
        "bad-metrics-line": "completed",
        "config-not-json": found["config-not-json"],
        "wrong-types": "completed",
        "a-file": "unreadable: not a folder",
        "huge-metrics": f"unreadable: metrics.jsonl is {MAX_METRICS_BYTES + 1:,} bytes, more than the 256 MB read",
        "link-out": "unreadable: a symbolic link (not followed)",
        "empty": "unreadable: an empty folder",
    }
    assert found["config-not-json"].startswith("unreadable: config.json is not valid JSON")
    rows = {row["name"]: row for row in list_runs(odd_root)}
    assert rows["good"]["loss"] == 4.5 and rows["loss-not-a-number"]["loss"] is None
    assert rows["wrong-types"]["model"] is None and rows["wrong-types"]["method"] == "lora"
    labels = dict((out, label) for label, out in past_runs(odd_root))
    assert labels[str(odd_root / "good")] == "Q-GaLore · good · completed · loss 4.500"
    assert labels[str(odd_root / "summary-list")].endswith("unreadable: summary.json holds a list, not a JSON object")
    assert len(labels) == 12


def test_read_run_returns_only_well_typed_data(odd_root):
    run = read_run(odd_root / "bad-metrics-line")
    assert [m["step"] for m in run["metrics"]] == [1, 3] and run["metrics"][1]["loss"] is None
    run = read_run(odd_root / "binary-metrics")
    assert run["metrics"] == [] and run["note"] == "metrics.jsonl holds no readable line"
    run = read_run(odd_root / "wrong-types")
    assert run["config"]["model"] is None and run["config"]["run"]["steps"] is None
    summary = run["summary"]
    assert summary["predicted"] is None and summary["measured"] is None and summary["comparison"]["peak_error"] is None
    assert summary["final"]["steps"] is None and summary["final"]["tokens_per_s"] is None
    assert [m["step"] for m in run["metrics"]] == [1] and "layers" not in run["metrics"][0]
    for name in ("a-file", "link-out", "huge-metrics", "nowhere"):
        run = read_run(odd_root / name)
        assert run["problem"] and run["metrics"] == []
        assert (run["summary"] is None) == (name != "huge-metrics")
    assert read_run(odd_root / "link-out")["config"] is None  # the link is not followed


def test_every_odd_run_shows_without_an_exception(odd_root):
    folders = [out for _, out in past_runs(odd_root)] + [str(odd_root / "nowhere")]
    board = Board([view_from_folder(f) for f in folders])
    status, progress, loss, memory, layers, comparison, table, files = render(board, with_downloads=True)
    rows = {r["run"].split(" · ")[1]: r for r in table.to_dict("records")}
    assert rows["good"]["final loss"] == "4.5000" and rows["good"]["run"] == "Q-GaLore · good"
    assert rows["loss-not-a-number"]["final loss"] == "5.0000"  # the summary's "abc": the last step's loss instead
    assert rows["wrong-types"]["predicted peak"] == "—" and rows["wrong-types"]["tokens/s"] == "—"
    assert rows["binary-metrics"]["steps"] == 3  # from the summary; no curve
    assert rows["summary-list"]["status"].startswith("unreadable: ") and rows["summary-list"]["final loss"] == "5.0000"
    assert rows["nowhere"]["status"] == "unreadable: no such file or directory"
    assert rows["link-out"]["status"] == "unreadable: a symbolic link (not followed)"
    assert {t.name for t in loss.data} >= {"Q-GaLore · good", "Q-GaLore · bad-metrics-line"}
    names = {Path(f).name for f in files}
    assert "good-metrics.csv" in names and "good-summary.json" in names
    assert not (odd_root.parent / "outside" / "exports").exists()  # nothing written through the link
    assert results_table(Board([view_from_folder(odd_root / "binary-metrics")])).iloc[0]["final loss"] == "4.5000"


def test_the_tab_lists_odd_runs_and_deletes_them_once_confirmed(odd_root):
    handlers = TrainHandlers(Runner(odd_root))
    past, model = handlers.refresh()
    choices = {value for _, value in past.choices}
    assert str(odd_root / "summary-list") in choices and str(odd_root / "a-file") in choices
    assert str(odd_root / "a-model") not in choices and str(odd_root / ".data") not in choices
    shown = handlers.show([str(odd_root / "summary-list"), str(odd_root / "a-file")])
    assert shown[6]["status"].str.startswith("unreadable").all()

    doomed = [str(odd_root / name) for name in ("summary-list", "a-file", "link-out", "huge-metrics")]
    with pytest.warns(UserWarning):  # gr.Warning outside a page
        assert "Nothing deleted: tick “yes, delete" in handlers.delete(doomed, False)[-1]
        assert "Nothing deleted: pick one or more" in handlers.delete([], True)[-1]
    assert all(os.path.lexists(f) for f in doomed)
    past, model, confirm, message = handlers.delete(doomed, True)
    assert message.startswith("Deleted 4 run(s): ") and "`a-file`" in message
    assert not any(os.path.lexists(f) for f in doomed)
    assert (odd_root.parent / "outside" / "config.json").exists()  # the link went, not what it pointed to
    assert confirm.value is False
    left = {value for _, value in past.choices}
    assert str(odd_root / "good") in left and not set(doomed) & left


def test_deleting_refuses_anything_but_a_run_folder_under_the_root(odd_root, tmp_path):
    outside = tmp_path / "outside"
    refused_paths = [str(outside), str(odd_root / ".." / "outside"), str(odd_root / ".data"), str(odd_root),
                     str(odd_root / "good" / "metrics.jsonl"), "good", str(odd_root / "link-out" / "config.json")]
    deleted, refused = delete_runs(odd_root, refused_paths)
    assert deleted == [] and len(refused) == len(refused_paths)
    assert all("not a run folder directly under" in why for why in refused)
    assert outside.exists() and (odd_root / ".data").exists() and (odd_root / "good" / "metrics.jsonl").exists()
    deleted, refused = delete_runs(odd_root, [str(odd_root / "good")], in_use={(odd_root / "good").resolve()})
    assert deleted == [] and refused == ["good: a run of this app is using it; stop it first"]
    deleted, refused = delete_runs(odd_root, [str(odd_root / "good"), str(odd_root / "good")])
    assert deleted == ["good"] and refused == ["good: already gone"] and not (odd_root / "good").exists()


def test_an_unreadable_file_is_listed_with_its_reason(tmp_path):
    out = run_folder(tmp_path, "locked")
    (out / "summary.json").chmod(0)
    try:
        if os.access(out / "summary.json", os.R_OK):
            pytest.skip("running as root: a chmod 000 file stays readable")
        assert statuses(tmp_path) == {"locked": "unreadable: summary.json: permission denied"}
        view = view_from_folder(out)
        assert view.status == "unreadable: summary.json: permission denied" and len(view.metrics) == 3
        render(Board([view]), with_downloads=True)
    finally:
        (out / "summary.json").chmod(0o644)
