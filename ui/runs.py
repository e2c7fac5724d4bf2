"""Training runs as the Train tab sees them: a board of runs (live or reloaded), its charts, table and downloads.

A `Board` holds one `RunView` per run: its metrics so far, the predicted estimate, and the
summary once it ends. `render` turns a board into the Train tab's outputs, so a live run and a
past run reloaded from its folder look the same. Whatever a run folder holds, nothing here raises:
lowrank.worker reads folders back well typed (a run it cannot read has status "unreadable: …"),
live events go through the same checks, and a missing value shows as "—".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lowrank.report import load_bytes
from lowrank.worker import (
    LIVE_KEYS,
    METRIC_KEYS,
    clean_metrics_line,
    clean_summary,
    list_runs,
    load_json,
    read_run,
)

from .charts import (
    METHOD_COLORS,
    OTHER_COLORS,
    comparison_figure,
    fmt_bytes,
    layers_figure,
    loss_figure,
    memory_figure,
)
from .widgets import METHOD_LABELS


def method_label(method: str | None) -> str:
    """The page's name of a method ("qgalore" -> "Q-GaLore"); an unknown one as it is, "?" for none."""
    return METHOD_LABELS.get(method, method) if method else "?"


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
        """Fold one worker event (lowrank.worker.Run.events) into `view` (lines and summaries checked
        as a folder read back is: lowrank.worker.clean_metrics_line, clean_summary)."""
        kind = event.get("type")
        if kind == "started":
            view.status = "running"
        elif kind == "step":
            line = clean_metrics_line({k: v for k, v in event.items() if k not in LIVE_KEYS})
            if line is not None:
                view.metrics.append(line)
        elif kind in ("summary", "stopped"):
            summary, problem = clean_summary(event.get("summary"))
            view.summary = summary
            view.predicted = (summary or {}).get("predicted") or view.predicted
            view.status = "completed" if kind == "summary" else "stopped"
            view.message = (summary or {}).get("message") or problem or ""
        elif kind == "error":
            view.summary = clean_summary(event.get("summary"))[0]
            view.status = "failed"
            message = event.get("message")
            view.message = message if isinstance(message, str) and message else "the run failed (no message)"


def view_from_folder(out: str | Path) -> RunView:
    """A past run, read back from its folder (never raises: what cannot be read shows as its reason)."""
    run = read_run(out)
    config, summary = run["config"] or {}, run["summary"]
    method = (config.get("method") or {}).get("method") or "?"
    if run["problem"]:
        status = f"unreadable: {run['problem']}"
    else:
        status = (summary or {}).get("status") or "interrupted"
    message = "; ".join(m for m in ((summary or {}).get("message"), run["problem"], run["note"]) if m)
    return RunView(label=f"{method_label(method)} · {run['name']}", method=method, out=str(out),
                   steps=(config.get("run") or {}).get("steps"), metrics=run["metrics"],
                   predicted=(summary or {}).get("predicted"), summary=summary, status=status, message=message)


def past_runs(root: str | Path, rows: list[dict] | None = None) -> list[tuple[str, str]]:
    """(label, folder) of every run under `root` (or of `rows`: lowrank.worker.list_runs), newest first,
    for a dropdown: unreadable ones too (shown with the reason, so they can be deleted); model folders
    left out."""
    choices = []
    for row in list_runs(root) if rows is None else rows:
        loss = f" · loss {row['loss']:.3f}" if _is_number(row["loss"]) else ""
        method = f"{method_label(row['method'])} · " if row["method"] else ""
        choices.append((f"{method}{row['name']} · {row['status']}{loss}", row["out"]))
    return choices


def _first(*values):
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def results_table(board: Board) -> pd.DataFrame:
    """Method, predicted peak, measured peak, error, the load's predicted and measured peak (building
    and preparing the model: lowrank/load.py), final loss, eval loss, tokens/s, per run."""
    rows = []
    for v in board.runs:
        s = v.summary if isinstance(v.summary, dict) else {}
        final = s.get("final") if isinstance(s.get("final"), dict) else {}
        comparison = s.get("comparison") if isinstance(s.get("comparison"), dict) else {}
        last = v.metrics[-1] if v.metrics else {}
        error = comparison.get("peak_error")
        steps = _first(final.get("steps"), last.get("step"))
        rows.append({
            "run": v.label, "status": v.status, "predicted peak": _bytes((v.predicted or {}).get("peak_bytes")),
            "measured peak": _bytes((v.measured or {}).get("peak_bytes")),
            "error": _num(error, 2, scale=100, sign="+", suffix="%"),
            "predicted load": _bytes(load_bytes(v.predicted)), "measured load": _bytes(s.get("load_peak_bytes")),
            "final loss": _num(_first(final.get("loss"), last.get("loss"))),
            "eval loss": _num(_first(final.get("eval_loss"), _last_eval(v.metrics))),
            "tokens/s": _num(_first(final.get("tokens_per_s"), last.get("tokens_per_s")), 0),
            "steps": steps if isinstance(steps, int) and not isinstance(steps, bool) else "—",
        })
    columns = ["run", "status", "predicted peak", "measured peak", "error", "predicted load", "measured load",
               "final loss", "eval loss", "tokens/s", "steps"]
    return pd.DataFrame(rows, columns=columns)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value, digits: int = 4, scale: float = 1, sign: str = "", suffix: str = "") -> str:
    """A number as text, "—" for anything that is not a number."""
    if not _is_number(value):
        return "—"
    try:
        return f"{value * scale:{sign},.{digits}f}{suffix}"
    except (OverflowError, ValueError):
        return "—"


def _bytes(value) -> str:
    if not _is_number(value):
        return "—"
    try:
        return fmt_bytes(value)
    except (OverflowError, ValueError):
        return "—"


def _last_eval(metrics: list[dict]) -> float | None:
    evals = [m["eval_loss"] for m in metrics if _is_number(m.get("eval_loss"))]
    return evals[-1] if evals else None


def progress_html(board: Board) -> str:
    import html

    text = html.escape(board.progress_text)
    if board.progress is None:
        return f"<div class='run-progress'><span>{text}</span></div>"
    percent = 100 * min(max(board.progress, 0.0), 1.0)
    return (f"<div class='run-progress'><progress value='{percent:.1f}' max='100' style='width:100%;height:14px'>"
            f"</progress><span>{text}</span></div>")


def run_colors(board: Board) -> dict[str, str]:
    """A color per run label: each method's own color (ui/charts.py METHOD_COLORS, as in the Plan tab)
    for its first run, other colors for more runs of the same method."""
    colors, used, others = {}, set(), iter(OTHER_COLORS * (1 + len(board.runs) // len(OTHER_COLORS)))
    for view in board.runs:
        color = METHOD_COLORS.get(view.method)
        colors[view.label] = color if color and color not in used else next(others)
        used.add(colors[view.label])
    return colors


def _recolor(fig, colors: dict[str, str]):
    """Give each trace of a run its run's color (a trace belongs to the run its legend group or name is)."""
    for trace in fig.data:
        color = colors.get(trace.legendgroup or trace.name)
        if color is None:
            continue
        if trace.type == "bar":
            trace.marker.color = color
        else:
            trace.line.color = color
    return fig


def figures(board: Board) -> tuple:
    """Loss, memory per step, layer gaps, predicted vs measured: one color per run in every chart."""
    runs = {v.label: v.metrics for v in board.runs if v.metrics or v.status == "running"}
    predicted = {v.label: _peak(v.predicted) for v in board.runs}
    layers = {v.label: v.metrics[-1]["layers"] for v in board.runs if v.metrics and v.metrics[-1].get("layers")}
    pairs = {v.label: (v.predicted, v.measured) for v in board.runs if v.measured and _peak(v.predicted)}
    colors = run_colors(board)
    return (_recolor(loss_figure(runs), colors), _recolor(memory_figure(runs, predicted), colors),
            _recolor(layers_figure(layers), colors), comparison_figure(pairs))


def _peak(memory: dict | None) -> int | float | None:
    peak = (memory or {}).get("peak_bytes") if isinstance(memory, dict) else None
    return peak if _is_number(peak) else None


def metrics_frame(metrics: list[dict]) -> pd.DataFrame:
    """The metrics lines as a table: METRIC_KEYS in order, then other keys as they first appear
    (layer gaps left out) — the same columns for a live run and for the run read back."""
    extra = []
    for line in metrics:
        extra += [k for k in _flat(line) if k not in METRIC_KEYS and k not in LIVE_KEYS and k not in extra]
    columns = [*METRIC_KEYS, *extra]
    return pd.DataFrame([{k: _flat(line).get(k) for k in columns} for line in metrics], columns=columns)


def _flat(line: dict) -> dict:
    """A metrics line's scalars, each rank's peak as its own column (layer gaps left out)."""
    out = {k: v for k, v in line.items() if k not in ("layers", "memory_peak_ranks")}
    for rank, peak in enumerate(line.get("memory_peak_ranks") or []):
        out[f"memory_peak_bytes_rank_{rank}"] = peak
    return out


def _writable_folder(out: Path) -> bool:
    """A real folder (not a link) that exports can be written into."""
    try:
        return stat.S_ISDIR(out.lstat().st_mode) and os.access(out, os.W_OK | os.X_OK)
    except OSError:
        return False


def export_run(view: RunView) -> list[str]:
    """Downloads of one run: metrics CSV, summary JSON, and the adapter (LoRA/QLoRA) as a zip.

    What cannot be written or read is left out (never raises)."""
    out = Path(view.out)
    if not _writable_folder(out):
        return []
    exports = out / "exports"
    files = []
    with contextlib.suppress(OSError):
        exports.mkdir(exist_ok=True)
    if not _writable_folder(exports):
        return []
    if view.metrics:
        csv = exports / f"{out.name}-metrics.csv"
        with contextlib.suppress(OSError):
            metrics_frame(view.metrics).to_csv(csv, index=False)
            files.append(str(csv))
    summary, _ = load_json(out / "summary.json")
    if summary is not None:
        path = exports / f"{out.name}-summary.json"
        with contextlib.suppress(OSError, ValueError):
            path.write_text(json.dumps(summary, indent=1, default=str))
            files.append(str(path))
    final = out / "final"
    if _adapter_folder(final):
        archive = exports / f"{out.name}-adapter"
        with contextlib.suppress(OSError):
            if not Path(f"{archive}.zip").exists():
                shutil.make_archive(str(archive), "zip", final)
            files.append(f"{archive}.zip")
    return files


def _adapter_folder(final: Path) -> bool:
    """final/ holds a PEFT adapter and nothing that links out of it (a zip would follow the link)."""
    try:
        if not stat.S_ISDIR(final.lstat().st_mode) or not (final / "adapter_config.json").is_file():
            return False
        return not any(p.is_symlink() for p in final.rglob("*"))
    except OSError:
        return False


def downloads(board: Board) -> list[str]:
    return [path for v in board.runs if v.status not in ("queued", "running") for path in export_run(v)]


def render(board: Board, with_downloads: bool = False) -> tuple:
    """The Train tab's outputs: status, progress, loss, memory, layer gaps, comparison, table, downloads."""
    loss, memory, layers, comparison = figures(board)
    files = downloads(board) if with_downloads else None
    return (board.status, progress_html(board), loss, memory, layers, comparison, results_table(board), files)


# ------------------------------------------------------------------------------------ deleting runs
def delete_runs(root: str | Path, folders: list[str], in_use: set[Path] = frozenset()) -> tuple[list[str], list[str]]:
    """Delete the run folders `folders` (entries directly under `root`), except those in `in_use`
    (resolved paths: runs of this app in progress). Returns (names deleted, "name: why not" refused).

    Only an entry directly under the root is deleted, by its name under the resolved root: a path
    elsewhere, a hidden entry (.data: the runs' data) or the root itself is refused; a symbolic
    link is removed, never followed."""
    base = Path(root).resolve()
    deleted, refused = [], []
    for folder in folders or []:
        given = Path(str(folder))
        name = given.name
        try:
            parent = given.parent.resolve()
        except (OSError, RuntimeError):
            parent = None
        if parent != base or name in ("", ".", "..") or name.startswith("."):
            refused.append(f"{folder}: not a run folder directly under {base}")
            continue
        target = base / name
        if target in in_use or any(target == p or target in p.parents for p in in_use):
            refused.append(f"{name}: a run of this app is using it; stop it first")
            continue
        try:
            if stat.S_ISDIR(target.lstat().st_mode):
                shutil.rmtree(target)  # removes links inside, never follows them
            else:
                target.unlink()  # a file, or a link (the link only)
        except FileNotFoundError:
            refused.append(f"{name}: already gone")
            continue
        except OSError as err:
            left = " (partly deleted)" if os.path.lexists(target) else ""
            refused.append(f"{name}: {(err.strerror or type(err).__name__).lower()}{left}")
            continue
        deleted.append(name)
    return deleted, refused
