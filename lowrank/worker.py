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

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .recipe import RunSpec, read_metrics

REPO = Path(__file__).resolve().parent.parent
LOG = "worker.log"


def command(spec: RunSpec, dry_run: bool = False, python: str = sys.executable) -> list[str]:
    """The argv that runs `spec` (`python -m lowrank.train` parses it back into the same spec)."""
    return [python, "-m", "lowrank.train", *spec.flags(), "--no-progress", *(["--dry-run"] if dry_run else [])]


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
        except (ValueError, UnicodeDecodeError):
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


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_run(out: str | Path) -> dict:
    """A run folder as data: its config, every metrics line (each step once), its summary (None while running)."""
    out = Path(out)
    return {"out": str(out), "name": out.name, "config": read_json(out / "config.json"),
            "metrics": read_metrics(out / "metrics.jsonl"), "summary": read_json(out / "summary.json")}


def list_runs(root: str | Path) -> list[dict]:
    """Past runs under `root`, newest first: name, method, model, status, final loss."""
    root = Path(root)
    rows = []
    for config_path in root.glob("*/config.json") if root.exists() else []:
        out = config_path.parent
        config = read_json(config_path) or {}
        summary = read_json(out / "summary.json") or {}
        rows.append({"name": out.name, "out": str(out), "method": (config.get("method") or {}).get("method"),
                     "model": config.get("model"), "status": summary.get("status", "running or interrupted"),
                     "loss": (summary.get("final") or {}).get("loss"), "mtime": config_path.stat().st_mtime})
    return sorted(rows, key=lambda r: -r["mtime"])
