"""Training runs as the Train tab sees them: a board of runs (live or reloaded), its charts, table and downloads.

A `Board` holds one `RunView` per run: its metrics so far, the predicted estimate, and the
summary once it ends. `render` turns a board into the Train tab's outputs, so a live run and a
past run reloaded from its folder look the same.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lowrank.worker import list_runs, read_run

from .charts import comparison_figure, fmt_bytes, layers_figure, loss_figure, memory_figure


@dataclass
class RunView:
    label: str
    method: str
    out: str
    steps: int | None = None
    metrics: list[dict] = field(default_factory=list)
    predicted: dict | None = None  # Estimate.to_dict() for this run
    summary: dict | None = None
    status: str = "queued"
    message: str = ""

    @property
    def measured(self) -> dict | None:
        return (self.summary or {}).get("measured")


@dataclass
class Board:
    runs: list[RunView] = field(default_factory=list)
    status: str = ""  # one line over the charts
    progress: float | None = None  # 0..1 of the current run, None when idle
    progress_text: str = ""

    def add(self, view: RunView) -> RunView:
        self.runs.append(view)
        return view

    def apply(self, view: RunView, event: dict) -> None:
        """Fold one worker event (lowrank.worker.Run.events) into `view`."""
        kind = event["type"]
        if kind == "started":
            view.status = "running"
        elif kind == "step":
            view.metrics.append({k: v for k, v in event.items() if k != "type"})
        elif kind in ("summary", "stopped"):
            view.summary = event["summary"]
            view.predicted = view.summary.get("predicted") or view.predicted
            view.status = "completed" if kind == "summary" else "stopped"
            view.message = view.summary.get("message", "")
        elif kind == "error":
            view.summary = event.get("summary")
            view.status = "failed"
            view.message = event["message"]


def view_from_folder(out: str | Path) -> RunView:
    """A past run, read back from its folder."""
    run = read_run(out)
    config, summary = run["config"] or {}, run["summary"]
    method = (config.get("method") or {}).get("method") or "?"
    status = summary["status"] if summary else "interrupted"
    return RunView(label=f"{method} · {run['name']}", method=method, out=str(out),
                   steps=(config.get("run") or {}).get("steps"), metrics=run["metrics"],
                   predicted=(summary or {}).get("predicted"), summary=summary, status=status,
                   message=(summary or {}).get("message", ""))


def past_runs(root: str | Path) -> list[tuple[str, str]]:
    """(label, folder) of every run under `root`, newest first, for a dropdown (model folders left out)."""
    choices = []
    for row in list_runs(root):
        if not (Path(row["out"]) / "metrics.jsonl").exists():
            continue
        loss = f" · loss {row['loss']:.3f}" if isinstance(row["loss"], (int, float)) else ""
        choices.append((f"{row['name']} · {row['status']}{loss}", row["out"]))
    return choices


def results_table(board: Board) -> pd.DataFrame:
    """Method, predicted peak, measured peak, error, final loss, eval loss, tokens/s, per run."""
    rows = []
    for v in board.runs:
        s = v.summary or {}
        final, comparison = s.get("final") or {}, s.get("comparison") or {}
        predicted = (v.predicted or {}).get("peak_bytes")
        measured = (v.measured or {}).get("peak_bytes")
        error = comparison.get("peak_error")
        last = v.metrics[-1] if v.metrics else {}
        rows.append({
            "run": v.label, "status": v.status, "predicted peak": fmt_bytes(predicted),
            "measured peak": fmt_bytes(measured), "error": "—" if error is None else f"{100 * error:+.2f}%",
            "final loss": _num(final.get("loss", last.get("loss"))),
            "eval loss": _num(final.get("eval_loss", _last_eval(v.metrics))),
            "tokens/s": _num(final.get("tokens_per_s", last.get("tokens_per_s")), 0),
            "steps": final.get("steps", last.get("step")),
        })
    columns = ["run", "status", "predicted peak", "measured peak", "error", "final loss", "eval loss", "tokens/s",
               "steps"]
    return pd.DataFrame(rows, columns=columns)


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _last_eval(metrics: list[dict]) -> float | None:
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    return evals[-1] if evals else None


def progress_html(board: Board) -> str:
    if board.progress is None:
        return f"<div class='run-progress'><span>{board.progress_text}</span></div>"
    percent = 100 * board.progress
    return (f"<div class='run-progress'><progress value='{percent:.1f}' max='100' style='width:100%;height:14px'>"
            f"</progress><span>{board.progress_text}</span></div>")


def figures(board: Board) -> tuple:
    runs = {v.label: v.metrics for v in board.runs if v.metrics or v.status == "running"}
    predicted = {v.label: (v.predicted or {}).get("peak_bytes") for v in board.runs}
    layers = {v.label: v.metrics[-1]["layers"] for v in board.runs if v.metrics and v.metrics[-1].get("layers")}
    pairs = {v.label: (v.predicted, v.measured) for v in board.runs if v.measured}
    return loss_figure(runs), memory_figure(runs, predicted), layers_figure(layers), comparison_figure(pairs)


def export_run(view: RunView) -> list[str]:
    """Downloads of one run: metrics CSV, summary JSON, and the adapter (LoRA/QLoRA) as a zip."""
    out = Path(view.out)
    exports = out / "exports"
    files = []
    if view.metrics:
        exports.mkdir(exist_ok=True)
        csv = exports / f"{out.name}-metrics.csv"
        pd.DataFrame([{k: v for k, v in m.items() if k != "layers"} for m in view.metrics]).to_csv(csv, index=False)
        files.append(str(csv))
    if (out / "summary.json").exists():
        exports.mkdir(exist_ok=True)
        summary = exports / f"{out.name}-summary.json"
        summary.write_text(json.dumps(json.loads((out / "summary.json").read_text()), indent=1))
        files.append(str(summary))
    final = out / "final"
    if (final / "adapter_config.json").exists():
        archive = exports / f"{out.name}-adapter"
        if not Path(f"{archive}.zip").exists():
            shutil.make_archive(str(archive), "zip", final)
        files.append(f"{archive}.zip")
    return files


def downloads(board: Board) -> list[str]:
    return [path for v in board.runs if v.status not in ("queued", "running") for path in export_run(v)]


def render(board: Board, with_downloads: bool = False) -> tuple:
    """The Train tab's outputs: status, progress, loss, memory, layer gaps, comparison, table, downloads."""
    loss, memory, layers, comparison = figures(board)
    files = downloads(board) if with_downloads else None
    return (board.status, progress_html(board), loss, memory, layers, comparison, results_table(board), files)
