"""Training runs of the app: worker processes started one after another, followed, stopped per session.

Plain Python, no Gradio: `train_methods` (Start) and `finetune_demo` are generators of worker
events (lowrank.worker) that fill a `Board`; the Train tab renders it. `Runner` remembers each
browser session's worker so that session's Stop ends it, and no worker outlives its generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from estimator.config import FullConfig, MethodConfig, TrainSetup
from estimator.estimate import estimate
from estimator.spec import preset_names
from lowrank.device import device_capacity, resolve_device
from lowrank.recipe import RunSpec
from lowrank.worker import Run, start_run

from .demo import write_task
from .runs import Board, RunView
from .widgets import METHOD_LABELS

DATA_SOURCES = ("Python docs (the default corpus)", "fine-tuning task: docstring → code, from the standard library (prompt → response)",
                "uploaded .txt or .jsonl")
MAX_DATA_BYTES = 64 << 20


def cuda_available() -> bool:
    return resolve_device("auto").type == "cuda"


def local_ranks() -> int:
    """How many training processes this machine can run at once: one per GPU, or per CPU core."""
    return torch.cuda.device_count() if cuda_available() else max(1, os.cpu_count() or 1)


class Runner:
    """The app's training workers: at most one per session at a time, stoppable from that session."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._active: dict[str, Run] = {}  # session -> its worker now
        self._waiting: set[str] = set()  # sessions whose Start waits in the device queue
        self._busy: set[str] = set()  # sessions inside a sequence of runs
        self._stop: set[str] = set()  # sessions that pressed Stop while waiting or during their sequence
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        """A fresh run folder under the root, named `<time>-<name>`."""
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^A-Za-z0-9._-]+', '-', name)[:60]}"
        out, n = self.root / base, 2
        while out.exists():
            out, n = self.root / f"{base}-{n}", n + 1
        return out

    def waiting(self, session: str) -> None:
        """This session's Start is queued behind another run: a Stop now cancels it before it starts."""
        with self._lock:
            self._stop.discard(session)
            self._waiting.add(session)

    def is_queued(self, session: str) -> bool:
        return session in self._waiting and session not in self._busy

    def done_waiting(self, session: str) -> None:
        with self._lock:
            self._waiting.discard(session)

    @contextlib.contextmanager
    def sequence(self, session: str) -> Iterator[None]:
        """A sequence of runs of this session: a Stop inside it (or while it waited) ends the run in
        progress and skips the rest."""
        with self._lock:
            if session not in self._waiting:
                self._stop.discard(session)  # started directly, not through the queue
            self._waiting.discard(session)
            self._busy.add(session)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(session)
                self._stop.discard(session)

    def stop_requested(self, session: str) -> bool:
        return session in self._stop

    def follow(self, spec: RunSpec, session: str, poll: float = 0.25) -> Iterator[dict]:
        """Start `spec` and yield its events; the worker never outlives the generator."""
        run = start_run(spec)
        with self._lock:
            self._active[session] = run
            stop_now = session in self._stop
        if stop_now:
            run.stop()
        try:
            yield from run.events(poll=poll)
        finally:
            if run.running:  # the page went away or the handler failed: end the worker too
                run.stop()
            with self._lock:
                self._active.pop(session, None)

    def stop(self, session: str) -> bool:
        """Stop this session's runs (the current one after its step); False when it has none."""
        with self._lock:
            if session not in self._busy and session not in self._waiting:
                return False
            self._stop.add(session)
            run = self._active.get(session)
        if run is not None:
            run.stop()
        return True

    def in_use(self) -> set[Path]:
        """Folders directly under the root that runs of this app use now (resolved): each running
        run's own folder, and the run folder its model comes from (a fine-tuning run's base)."""
        with self._lock:
            runs = list(self._active.values())
        root, used = self.root.resolve(), set()
        for run in runs:
            for path in (Path(run.out), Path(run.spec.model).expanduser()):
                with contextlib.suppress(OSError, RuntimeError, ValueError, IndexError):
                    used.add(root / path.resolve().relative_to(root).parts[0])
        return used

    def stop_all(self) -> None:
        with self._lock:
            runs = list(self._active.values())
        for run in runs:
            run.stop(timeout=5)


def data_path(choice: str, upload: str | None, root: Path) -> str | None:
    """The --data of the runs: None (default corpus), the generated task, or a copy of the upload."""
    if choice == DATA_SOURCES[1]:
        return str(write_task(root / ".data"))
    if choice != DATA_SOURCES[2]:
        return None
    if not upload:
        raise ValueError("no data file uploaded; upload a .txt or .jsonl file, or choose the default corpus")
    path = Path(upload)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"data file {path.name!r} must be .txt (plain text) or .jsonl (prompt/response records)")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise ValueError(f"data file {path.name!r} is {path.stat().st_size / 2**20:.0f} MB; the limit is 64 MB")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    kept = root / ".data" / f"{digest}-{path.name}"  # kept beside the runs that used it
    if not kept.exists():
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
    return str(kept)


def predict(model: str, cfg: MethodConfig, setup: TrainSetup, device: str) -> dict:
    """The run's predicted memory; ValueError when the model or options are wrong or it cannot fit."""
    where = resolve_device(device)
    est = estimate(model, cfg, setup, device=where.type)
    capacity = device_capacity(where)
    if capacity and est.total_bytes > capacity:
        raise ValueError(f"{METHOD_LABELS[cfg.method]} on {model} needs about {est.total_bytes / 2**30:.1f} GiB, "
                         f"more than this device's {capacity / 2**30:.1f} GiB; lower the batch size or sequence "
                         "length, turn on gradient checkpointing, or pick a smaller model")
    return est.to_dict()


def model_slug(model: str) -> str:
    path = Path(model)
    if model in preset_names() or not path.exists():
        return model.replace("/", "--")
    return f"{path.parent.name}-{path.name}" if path.name == "final" else path.name


def whole(value, name: str, low: int) -> int:
    """A widget's number as a whole number ≥ `low`; ValueError naming the field otherwise."""
    if value is None or value == "":
        raise ValueError(f"{name} is empty; give a whole number ≥ {low}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not float(value).is_integer() or value < low:
        raise ValueError(f"{name}={value!r} must be a whole number ≥ {low}")
    return int(value)


def plan_runs(runner: Runner, model: str, configs: list[MethodConfig], setup: TrainSetup, steps: int,
              lr: float | None, data: str | None, eval_every: int, seed: int, device: str,
              prefix: str = "") -> list[tuple[str, RunSpec, dict]]:
    """(label, RunSpec, predicted) per method: same model, data, setup and seed."""
    model = (model or "").strip()
    if not model:
        raise ValueError("model is empty; pick a tiny preset, or give a model folder or hub id")
    steps, eval_every, seed = whole(steps, "steps", 1), whole(eval_every, "eval every", 0), whole(seed, "seed", 0)
    items = []
    for cfg in configs:
        predicted = predict(model, cfg, setup, device)
        out = runner.folder(f"{prefix}{model_slug(model)}-{cfg.method}")
        spec = RunSpec(model, cfg, setup, out=str(out), steps=steps, lr=lr or None, data=data,
                       eval_every=eval_every, seed=seed, device=device)
        items.append((f"{METHOD_LABELS[cfg.method]}{' (fine-tune)' if prefix else ''}", spec, predicted))
    return items


class Pace:
    """The time left for a sequence of runs, from what its runs took so far.

    A run costs its start (the worker starting, loading the model and data: from "started" to its
    first step), its steps at the sequence's wall time per step (evaluations included), and its end
    (the last evaluation, saving: from its last step to its final event). Each is a mean over every
    run and step so far (the workers' own step times weigh in as `PRIOR_STEPS` steps), and the
    moment the runs will end is smoothed (`SMOOTHING` of each new estimate): it settles instead of
    following one step's time. Nothing is estimated before `MIN_STEPS` steps."""

    PRIOR_STEPS = 5
    MIN_STEPS = 3
    SMOOTHING = 0.25

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.wall, self.span = 0.0, 0  # wall seconds between step events of a run, and the steps they cover
        self.reported, self.reported_n = 0.0, 0  # the workers' step_time_s
        self.steps_seen = 0
        self.starts: list[float] = []
        self.ends: list[float] = []
        self._started: float | None = None
        self._last: tuple[float, int] | None = None  # (time, step) of this run's last step event
        self._end_run: float | None = None  # when this run and all runs will end (smoothed)
        self._end_all: float | None = None

    def started(self) -> None:
        self._started, self._last, self._end_run = self.clock(), None, None

    def step(self, step: int, seconds) -> None:
        now = self.clock()
        self.steps_seen += 1
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 <= seconds < math.inf:
            self.reported, self.reported_n = self.reported + seconds, self.reported_n + 1
        else:
            seconds = 0.0
        if self._last is None:
            if self._started is not None:
                self.starts.append(max(0.0, now - self._started - seconds))
        elif step > self._last[1]:
            self.wall, self.span = self.wall + now - self._last[0], self.span + step - self._last[1]
        self._last = (now, step)

    def ended(self) -> None:
        if self._last is not None:
            self.ends.append(max(0.0, self.clock() - self._last[0]))
        self._started, self._last = None, None

    def per_step(self) -> float | None:
        """Seconds per step: the wall time per step so far, weighed with the workers' step times."""
        if not self.reported_n:
            return self.wall / self.span if self.span else None
        prior = self.reported / self.reported_n
        return (self.wall + self.PRIOR_STEPS * prior) / (self.span + self.PRIOR_STEPS)

    def left(self, steps_left: int, later: list[int], starting: bool = False) -> tuple[float | None, float | None]:
        """(seconds left for this run, for this run and the `later` runs (their steps)); None where
        nothing is known yet. `starting`: this run has not reached its first step."""
        pace = self.per_step()
        if pace is None or self.steps_seen < self.MIN_STEPS or (starting and not self.starts):
            return None, None
        now = self.clock()
        start = sum(self.starts) / len(self.starts) if self.starts else 0.0
        end = sum(self.ends) / len(self.ends) if self.ends else 0.0
        this = steps_left * pace + end
        if starting:
            this += max(0.0, start - (now - self._started if self._started is not None else 0.0))
        self._end_run = self._smooth(self._end_run, now + this)
        if later and not self.starts:
            return self._end_run - now, None
        self._end_all = self._smooth(self._end_all, now + this + sum(start + n * pace + end for n in later))
        return max(0.0, self._end_run - now), max(0.0, self._end_all - now)

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)


def _loss(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def run_sequence(runner: Runner, session: str, board: Board, items: list[tuple[str, RunSpec, dict]],
                 pace: Pace | None = None, later: tuple[int, ...] = ()) -> Iterator[dict]:
    """Run `items` one after another on `board`, yielding each worker event; a Stop skips the rest.

    The progress line says which run is starting, then its step, loss and time left (`pace`: what
    the runs so far took; `later`: the steps of runs that will follow this sequence)."""
    pace = pace or Pace()
    views = [board.add(RunView(label, spec.method.method, str(spec.out), spec.steps, predicted=predicted))
             for label, spec, predicted in items]
    for i, (view, (_, spec, _)) in enumerate(zip(views, items)):
        if runner.stop_requested(session):
            view.status = "skipped (stopped)"
            continue
        head = f"{view.label} ({i + 1}/{len(items)})"
        rest = [s.steps for _, s, _ in items[i + 1:]] + list(later)
        board.status = f"Running **{view.label}** ({i + 1} of {len(items)}) in `{spec.out}`"
        for event in runner.follow(spec, session):
            board.apply(view, event)
            kind = event.get("type")
            if kind == "started":
                pace.started()
                board.progress = 0.0
                board.progress_text = f"starting {head}…{_for_all(pace.left(spec.steps, rest, starting=True), rest)}"
            elif kind == "step":
                step = event.get("step") if isinstance(event.get("step"), int) else 0
                pace.step(step, event.get("step_time_s"))
                board.progress = min(max(step / spec.steps, 0.0), 1.0)
                left = pace.left(max(spec.steps - step, 0), rest)
                where = f"{head} · step {step}/{spec.steps} · loss {_loss(event.get('loss'))}"
                if step >= spec.steps:
                    board.progress_text = f"{where} · finishing (last evaluation, saving)…{_for_all(left, rest)}"
                else:
                    this = "estimating the time left" if left[0] is None else f"{duration(left[0])} left for this run"
                    board.progress_text = f"{where} · {this}{_for_all(left, rest)}"
            else:
                pace.ended()
            yield event
        board.progress = None
    board.progress_text = ""


def _for_all(left: tuple[float | None, float | None], rest: list[int]) -> str:
    """", about … for all" when more runs follow and the time they take is known."""
    return f", about {duration(left[1])} for all" if rest and left[1] is not None else ""


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def _markdown(text: str) -> str:
    """`text` shown as it is in Markdown (paths and messages hold _ and *)."""
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", text)


def closing_line(board: Board, stopped: bool) -> str:
    """How the sequence ended: runs completed, what failed and why, and what is below."""
    done = sum(v.status == "completed" for v in board.runs)
    line = f"{'Stopped' if stopped else 'Done'}: {done} of {len(board.runs)} runs completed"
    failed = [f"**{_markdown(v.label)}** failed: {_markdown(v.message.rstrip('. ') or 'no message')}"
              for v in board.runs if v.status == "failed"]
    line += (" — " + "; ".join(failed) if failed else "") + "."
    below = []
    if any(v.measured and v.predicted for v in board.runs):
        below.append("predicted vs measured memory below")
    if any(v.metrics or v.summary for v in board.runs if v.status not in ("queued", "running")):
        below.append("downloads at the bottom")
    return line + (f" {'; '.join(below).capitalize()}." if below else "")


def finish(board: Board, runner: Runner, session: str) -> None:
    """The board's last line: how many runs completed, what failed and why."""
    board.status = closing_line(board, runner.stop_requested(session))
    board.progress, board.progress_text = None, ""


def train_methods(runner: Runner, session: str, board: Board, model: str, configs: list[MethodConfig],
                  setup: TrainSetup, steps: int, lr: float | None, data: str | None, eval_every: int, seed: int,
                  device: str) -> Iterator[dict]:
    """Start: every chosen method on the same model, data and seed, one after another."""
    items = plan_runs(runner, model, configs, setup, steps, lr, data, eval_every, seed, device)
    with runner.sequence(session):
        yield from run_sequence(runner, session, board, items)
        finish(board, runner, session)


# The demo's fine-tuning learning rates when none is given (the trainer's defaults are for
# pre-training from scratch; GaLore's 1e-2 overfits the small task).
FINETUNE_LR = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3, "galore": 3e-3, "qgalore": 3e-3}


def finetune_demo(runner: Runner, session: str, board: Board, base: str, pretrain_steps: int, finetune_steps: int,
                  configs: list[MethodConfig], setup: TrainSetup, lr: float | None, eval_every: int, seed: int,
                  device: str) -> Iterator[dict]:
    """Pre-train `base` with full training on the default corpus, then fine-tune it with each method on the task."""
    task = write_task(runner.root / ".data")
    pre = plan_runs(runner, base, [FullConfig()], setup, pretrain_steps, None, None, eval_every, seed, device)
    pre = [(f"pre-training ({METHOD_LABELS['full']})", pre[0][1], pre[0][2])]
    finetune_steps = whole(finetune_steps, "fine-tuning steps", 1)
    for cfg in configs:  # check every option before the long pre-training (the model is the base's shape)
        predict(base, cfg, setup, device)
    pace = Pace()
    with runner.sequence(session):
        yield from run_sequence(runner, session, board, pre, pace, later=(finetune_steps,) * len(configs))
        pretrained = board.runs[-1]
        final = ((pretrained.summary or {}).get("final") or {}).get("final_dir")
        if pretrained.status != "completed" or not final:
            why = f": {_markdown(pretrained.message.rstrip('. '))}" if pretrained.message else ""
            board.status = f"Pre-training {pretrained.status}{why}; the fine-tuning runs were skipped."
            board.progress, board.progress_text = None, ""
            return
        items = [item for cfg in configs  # fine-tuning rates: gentler than pre-training's for GaLore
                 for item in plan_runs(runner, final, [cfg], setup, finetune_steps, lr or FINETUNE_LR[cfg.method],
                                       str(task), eval_every, seed, device, prefix="ft-")]
        yield from run_sequence(runner, session, board, items, pace)
        finish(board, runner, session)
