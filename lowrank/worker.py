"""Training runs in a worker process: start one, follow its events, stop it.

The app never trains in its own process. `start_run` launches `python -m lowrank.train` (never
through a shell) with the flags of a RunSpec (lowrank/recipe.py), and `Run.events()` follows the
run folder: one event per metrics line, then the summary. A crash, an out-of-memory error or a
killed process becomes an "error" event carrying the predicted peak and the device's capacity;
the caller keeps going, and everything the run wrote stays on disk. A dry run goes the same
way (`dry_run=True`): no steps, then its summary.

    run = start_run(RunSpec("tiny-llama-5m", LoRAConfig(rank=8), TrainSetup(batch_size=4, seq_len=128),
                            out="runs/lora-1", steps=100))
    for event in run.events():
        if event["type"] == "step": print(event["step"], event["loss"], event["eta_s"])
        elif event["type"] in ("summary", "stopped", "error"): print(event)
    run.stop()   # SIGTERM: the step in progress finishes, the run ends as "stopped"
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .recipe import RunSpec, read_metrics

REPO = Path(__file__).resolve().parent.parent
LOG = "worker.log"
WORKER_NICENESS = 5  # only matters when the CPU is contended: then estimates answer first


def command(spec: RunSpec, dry_run: bool = False, python: str = sys.executable) -> list[str]:
    """The argv that runs `spec` (`python -m lowrank.train` parses it back into the same spec).
    Several GPUs train under torchrun, one process per rank on this machine (`--standalone`: its
    own rendezvous on a free port); a dry run is rank 0 alone, on a fake process group."""
    launcher = [python]
    if spec.setup.gpus > 1 and not dry_run:
        launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(spec.setup.gpus)]
    return [*launcher, "-m", "lowrank.train", *spec.flags(), "--no-progress", *(["--dry-run"] if dry_run else [])]


def read_new_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """Complete JSON lines of `path` after byte `offset`, and the offset after them (a line that
    does not parse is skipped: a reader never fails on what a run wrote)."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next read
    lines = []
    for raw in chunk[:end].splitlines():
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    return lines, offset + end


class Run:
    """A started training process and its run folder."""

    def __init__(self, spec: RunSpec, argv: list[str]) -> None:
        self.spec, self.out = spec, Path(spec.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._log = (self.out / LOG).open("ab")
        self._started_wall = time.time()
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        with contextlib.suppress(OSError, AttributeError):  # a lower priority: the app stays responsive beside it
            os.setpriority(os.PRIO_PROCESS, self.process.pid, WORKER_NICENESS)  # (torchrun's ranks inherit it)
        self._offset = 0
        self._step_times: list[float] = []
        self._stop_requested = False

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the run to stop after its current step (SIGTERM); kill it if it does not."""
        self._stop_requested = True
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()

    def events(self, poll: float = 0.25, timeout: float | None = None) -> Iterator[dict]:
        """Yield "started", one "step" per metrics line, then "summary", "stopped" or "error"."""
        yield {"type": "started", "out": str(self.out), "pid": self.process.pid, "steps": self.spec.steps,
               "method": self.spec.method.method}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            finished = not self.running
            lines, self._offset = read_new_lines(self.out / "metrics.jsonl", self._offset)
            for line in lines:
                yield self._step_event(line)
            if finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                deadline = None
            time.sleep(poll)
        self._log.close()
        yield self._final_event()

    def _step_event(self, line: dict) -> dict:
        """A metrics line plus progress and the time left (the mean step time so far × steps left)."""
        step, total = line["step"], self.spec.steps
        self._step_times.append(line.get("step_time_s", 0.0))
        pace = sum(self._step_times) / len(self._step_times)
        return {"type": "step", **line, "progress": step / total, "eta_s": pace * (total - step)}

    def _final_event(self) -> dict:
        code = self.process.returncode
        path = self.out / "summary.json"
        summary = read_json(path)
        fresh = summary is not None and path.stat().st_mtime >= self._started_wall
        status = summary.get("status") if fresh else None
        if status in ("completed", "dry-run") and code == 0:
            return {"type": "summary", "summary": summary}
        if status == "stopped":
            return {"type": "stopped", "summary": summary}
        message = summary["message"] if fresh and summary.get("message") else self._failure_message(code)
        predicted, capacity = self._predicted_and_capacity(summary if fresh else None)
        return {"type": "error", "message": message, "returncode": code, "predicted_peak_bytes": predicted,
                "capacity_bytes": capacity, "log_tail": self.log_tail(), "summary": summary if fresh else None}

    def _failure_message(self, code: int | None) -> str:
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            why = "stopped by request" if self._stop_requested else "killed"
            return f"the training process was {why} ({name}); what it wrote so far stays in {self.out}"
        tail = [line for line in self.log_tail().splitlines() if line.strip()]
        last = tail[-1] if tail else f"exit status {code}"
        return f"the training process failed: {last.removeprefix('python -m lowrank.train: ').removeprefix('error: ')}"

    def _predicted_and_capacity(self, summary: dict | None) -> tuple[int | None, int | None]:
        from .device import device_capacity, resolve_device

        if summary is not None:
            return (summary.get("predicted") or {}).get("peak_bytes"), summary.get("device_capacity_bytes")
        try:
            from estimator.estimate import estimate

            device = resolve_device(self.spec.device, fake=True)
            predicted = estimate(self.spec.model, self.spec.method, self.spec.setup, device=device.type).total_bytes
        except ValueError:
            device, predicted = resolve_device("auto"), None
        return predicted, device_capacity(device)

    def log_tail(self, lines: int = 20) -> str:
        path = self.out / LOG
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_run(spec: RunSpec, dry_run: bool = False, python: str = sys.executable) -> Run:
    """Launch the run (or its dry run) in a new process and return its handle (the folder is created)."""
    return Run(spec, command(spec, dry_run, python))


# ------------------------------------------------------------------------------ run folders read back
# A runs folder can hold anything (a copied, half-deleted or hand-edited run, a file, a link): what
# follows never raises. Each file is checked before it is read (a regular file, not a link, not too
# big), JSON must be an object, and the fields the app reads are checked one by one: a value of the
# wrong type becomes None, a run that cannot be read is listed with the reason.
MAX_JSON_BYTES = 16 << 20  # config.json, summary.json: a few KB as the trainer writes them
MAX_METRICS_BYTES = 256 << 20  # metrics.jsonl: about a million steps
METRIC_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "memory_peak_bytes",
               "eval_loss")  # a metrics line as lowrank.recipe.StepResult.line writes it (layers apart)
LIVE_KEYS = ("type", "progress", "eta_s")  # what Run.events adds to a metrics line
MAX_STEP = 2**53
MAX_RANKS = 1 << 16  # estimator.config.MAX_GPUS


def _number(value: Any) -> int | float | None:
    """`value` when it is a number a float can hold (NaN and infinities kept: a loss can diverge), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        float(value)
    except OverflowError:
        return None
    return value


def _bytes(value: Any) -> int | float | None:
    """A byte count: a finite number, else None."""
    number = _number(value)
    return number if number is not None and math.isfinite(number) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _whole(value: Any, low: int = 0, high: int = MAX_STEP) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and low <= value < high else None


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n:,} bytes"


def _why(err: OSError) -> str:
    return (err.strerror or type(err).__name__).lower()


def _kind(data: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if data is None else kinds.get(type(data), type(data).__name__)


def file_problem(path: Path, limit: int) -> str | None:
    """Why `path` cannot be read as a run file (a link, not a regular file, over `limit` bytes,
    unreadable); None when it can, or does not exist."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"{path.name}: {_why(err)}"
    if stat.S_ISLNK(info.st_mode):
        return f"{path.name} is a symbolic link (not followed)"
    if not stat.S_ISREG(info.st_mode):
        return f"{path.name} is not a file"
    if info.st_size > limit:
        return f"{path.name} is {info.st_size:,} bytes, more than the {_size(limit)} read"
    if not os.access(path, os.R_OK):
        return f"{path.name}: permission denied"
    return None


def load_json(path: Path, limit: int = MAX_JSON_BYTES) -> tuple[dict | None, str | None]:
    """(the JSON object in `path`, None), or (None, why not: a short reason naming the file);
    (None, None) when it does not exist."""
    problem = file_problem(path, limit)
    if problem:
        return None, problem
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, f"{path.name}: {_why(err)}"
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        return None, f"{path.name} is not text (binary data)"
    except ValueError as err:
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        return None, f"{path.name} is not valid JSON ({getattr(err, 'msg', err)}{where})"
    except RecursionError:
        return None, f"{path.name} is nested too deeply to read"
    if not isinstance(data, dict):
        return None, f"{path.name} holds {_kind(data)}, not a JSON object"
    return data, None


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None when it is missing, unreadable or not an object."""
    return load_json(Path(path))[0]


def clean_memory(data: Any) -> dict | None:
    """A predicted or measured memory (Estimate.to_dict's shape) whose peak and breakdown are
    numbers; None when its peak is not a number. Other keys pass through."""
    if not isinstance(data, dict) or _bytes(data.get("peak_bytes")) is None:
        return None
    breakdown = data.get("breakdown") if isinstance(data.get("breakdown"), dict) else {}
    return {**data, "peak_bytes": data["peak_bytes"], "overhead_bytes": _bytes(data.get("overhead_bytes")),
            "phase": _text(data.get("phase")), "moment": _text(data.get("moment")),
            "breakdown": {k: v for k, v in breakdown.items() if isinstance(k, str) and _bytes(v) is not None}}


def clean_summary(data: Any) -> tuple[dict | None, str | None]:
    """(summary.json with every field the app reads well typed, the reason it is not a run's summary
    or None). A field of the wrong type becomes None ("final" an empty dict)."""
    if not isinstance(data, dict):
        return None, None if data is None else f"summary.json holds {_kind(data)}, not a JSON object"
    final = data.get("final") if isinstance(data.get("final"), dict) else {}
    comparison = data.get("comparison") if isinstance(data.get("comparison"), dict) else None
    summary = {
        **data, "status": _text(data.get("status")), "message": _text(data.get("message")) or "",
        "model": _text(data.get("model")), "method": _text(data.get("method")), "device": _text(data.get("device")),
        "device_capacity_bytes": _bytes(data.get("device_capacity_bytes")),
        "predicted": clean_memory(data.get("predicted")), "measured": clean_memory(data.get("measured")),
        "comparison": None if comparison is None else {**comparison,
                                                       "peak_error": _number(comparison.get("peak_error"))},
        "final": {"steps": _whole(final.get("steps")), "loss": _number(final.get("loss")),
                  "eval_loss": _number(final.get("eval_loss")), "tokens_per_s": _number(final.get("tokens_per_s")),
                  "train_seconds": _number(final.get("train_seconds")), "final_dir": _text(final.get("final_dir"))},
    }
    problem = None if summary["status"] else 'summary.json has no "status" (text)'
    return summary, problem


def clean_config(data: Any) -> tuple[dict | None, str | None]:
    """(config.json with the fields the app reads well typed — model, method {"method": name, …},
    run {"steps"} — the reason it is not a run's config or None)."""
    if not isinstance(data, dict):
        return None, None if data is None else f"config.json holds {_kind(data)}, not a JSON object"
    method = data.get("method")
    method = method if isinstance(method, dict) and _text(method.get("method")) else None
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    config = {**data, "model": _text(data.get("model")), "method": method,
              "run": {**run, "steps": _whole(run.get("steps"), 1)}}
    return config, None if method else 'config.json names no method ("method": {"method": …})'


def clean_layers(data: Any) -> dict | None:
    """GaLore's per-layer gaps of a metrics line: names (text), gap (numbers), svd_count; None when malformed."""
    if not isinstance(data, dict):
        return None
    names, gap, count = data.get("names"), data.get("gap"), data.get("svd_count")
    if not (isinstance(names, list) and isinstance(gap, list) and len(names) == len(gap) and names
            and all(isinstance(n, str) for n in names) and all(_number(g) is not None for g in gap)):
        return None
    layers = {"names": names, "gap": gap}
    if isinstance(count, list) and len(count) == len(names) and all(_number(c) is not None for c in count):
        layers["svd_count"] = count
    return layers


def clean_metrics_line(line: Any) -> dict | None:
    """A metrics line as the app uses it, live or read back: an int step, every key of METRIC_KEYS
    (a number or None), other scalar keys as written, valid layer gaps; None without a step. What
    Run.events adds (progress, eta_s) is left out, so a live run and the same run read back match."""
    if not isinstance(line, dict) or _whole(line.get("step")) is None:
        return None
    out = {"step": line["step"], **{key: _number(line.get(key)) for key in METRIC_KEYS[1:]}}
    for key, value in line.items():
        if key not in out and key not in LIVE_KEYS and key != "layers" and isinstance(key, str) \
                and (value is None or isinstance(value, str) or _number(value) is not None):
            out[key] = value
    layers = clean_layers(line.get("layers"))
    if layers:
        out["layers"] = layers
    ranks = line.get("memory_peak_ranks")  # several ranks: each one's peak, in rank order
    if isinstance(ranks, list) and 0 < len(ranks) <= MAX_RANKS and all(_bytes(r) is not None for r in ranks):
        out["memory_peak_ranks"] = ranks
    return out


def _folder_problem(out: Path) -> tuple[set[str], str | None]:
    """(names in the run folder, why it cannot be read as one or None)."""
    try:
        info = out.lstat()
    except OSError as err:
        return set(), _why(err)
    if stat.S_ISLNK(info.st_mode):
        return set(), "a symbolic link (not followed)"
    if not stat.S_ISDIR(info.st_mode):
        return set(), "not a folder"
    try:
        with os.scandir(out) as entries:
            return {e.name for e in entries}, None
    except OSError as err:
        return set(), f"the folder cannot be read ({_why(err)})"


def inspect_run(out: Path) -> dict:
    """A run folder's config and summary (checked, well typed), the names in it, and the first
    reason it cannot be read as a run (None when it can). Reads no metrics."""
    names, problem = _folder_problem(out)
    config = summary = None
    if problem is None:
        raw, config_problem = load_json(out / "config.json")
        config, shape = clean_config(raw)
        config_problem = config_problem or shape
        raw, summary_problem = load_json(out / "summary.json")
        summary, shape = clean_summary(raw)
        summary_problem = summary_problem or shape
        if "config.json" not in names:
            config_problem = ("no config.json yet (see worker.log)" if LOG in names
                              else "no config.json: not a run folder" if names else "an empty folder")
        problem = config_problem or summary_problem or file_problem(out / "metrics.jsonl", MAX_METRICS_BYTES)
    return {"names": names, "config": config, "summary": summary, "problem": problem}


def _metrics(path: Path) -> list[dict]:
    """Every metrics line of `path`, each step once (lowrank.recipe.read_metrics), well typed."""
    try:
        lines = read_metrics(path)
    except RecursionError:  # a line nested deeper than json parses: read it line by line instead
        by_step = {line["step"]: line for line in read_new_lines(path, 0)[0]}
        lines = [by_step[step] for step in sorted(by_step)]
    return [clean for line in lines if (clean := clean_metrics_line(line)) is not None]


def read_run(out: str | Path) -> dict:
    """A run folder as data: its config, every metrics line (each step once), its summary (None
    while running), all well typed, and `problem`: why it cannot be read as a run (None when it
    can), `note`: what was left out. Never raises."""
    out = Path(out)
    run = inspect_run(out)
    metrics, note = [], None
    path = out / "metrics.jsonl"
    if "metrics.jsonl" in run["names"] and file_problem(path, MAX_METRICS_BYTES) is None:
        try:
            metrics = _metrics(path)
            if not metrics and path.lstat().st_size:
                note = "metrics.jsonl holds no readable line"
        except OSError as err:  # gone or changed since it was checked
            note = f"metrics.jsonl: {_why(err)}"
    return {"out": str(out), "name": out.name, "config": run["config"], "metrics": metrics,
            "summary": run["summary"], "problem": run["problem"], "note": note}


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _model_folder(out: Path, names: set[str]) -> bool:
    """A model folder (Hugging Face config.json, no run files) kept beside the runs: not a run."""
    if names & {"metrics.jsonl", "summary.json", LOG} or "config.json" not in names:
        return False
    config = read_json(out / "config.json")
    return config is not None and "method" not in config


def list_runs(root: str | Path) -> list[dict]:
    """Every run under `root`, newest first: name, folder, method, model, status, final loss.

    Each entry directly under `root` (hidden ones and model folders left out) is listed; one that
    cannot be read as a run has status "unreadable: <reason>". Never raises."""
    root = Path(root)
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    except OSError:
        entries = []
    rows = []
    for out in entries:
        if out.name.startswith("."):
            continue
        run = inspect_run(out)
        if _model_folder(out, run["names"]):
            continue
        config, summary = run["config"] or {}, run["summary"] or {}
        status = (f"unreadable: {run['problem']}" if run["problem"]
                  else summary.get("status") or "running or interrupted")
        rows.append({"name": out.name, "out": str(out), "method": (config.get("method") or {}).get("method"),
                     "model": config.get("model"), "status": status,
                     "loss": (summary.get("final") or {}).get("loss"),
                     "mtime": _mtime(out / "config.json") if "config.json" in run["names"] else _mtime(out)})
    return sorted(rows, key=lambda r: -r["mtime"])
