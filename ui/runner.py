"""Training runs of the app: worker processes started one after another, followed, stopped per session.

Plain Python, no Gradio: `train_methods` (Start) and `finetune_demo` are generators of worker
events (lowrank.worker) that fill a `Board`; the Train tab renders it. `Runner` remembers each
browser session's worker so that session's Stop ends it, and no worker outlives its generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


def plan_runs(runner: Runner, model: str, configs: list[MethodConfig], setup: TrainSetup, steps: int,
              lr: float | None, data: str | None, eval_every: int, seed: int, device: str,
              prefix: str = "") -> list[tuple[str, RunSpec, dict]]:
    """(label, RunSpec, predicted) per method: same model, data, setup and seed."""
    model = (model or "").strip()
    if not model:
        raise ValueError("model is empty; pick a tiny preset, or give a model folder or hub id")
    items = []
    for cfg in configs:
        predicted = predict(model, cfg, setup, device)
        out = runner.folder(f"{prefix}{model_slug(model)}-{cfg.method}")
        spec = RunSpec(model, cfg, setup, out=str(out), steps=int(steps), lr=lr or None, data=data,
                       eval_every=int(eval_every), seed=int(seed), device=device)
        items.append((f"{cfg.method}{' (fine-tune)' if prefix else ''}", spec, predicted))
    return items


def run_sequence(runner: Runner, session: str, board: Board,
                 items: list[tuple[str, RunSpec, dict]]) -> Iterator[dict]:
    """Run `items` one after another on `board`, yielding each worker event; a Stop skips the rest."""
    views = [board.add(RunView(label, spec.method.method, str(spec.out), spec.steps, predicted=predicted))
             for label, spec, predicted in items]
    for i, (view, (_, spec, _)) in enumerate(zip(views, items)):
        if runner.stop_requested(session):
            view.status = "skipped (stopped)"
            continue
        board.status = f"Running **{view.label}** ({i + 1} of {len(items)}) in `{spec.out}`"
        for event in runner.follow(spec, session):
            board.apply(view, event)
            if event["type"] == "step":
                left = event["eta_s"] + (len(items) - i - 1) * event["step_time_s"] * spec.steps
                board.progress = event["progress"]
                board.progress_text = (f"{view.label} ({i + 1}/{len(items)}) · step {event['step']}/{spec.steps} · "
                                       f"loss {event['loss']:.3f} · {duration(event['eta_s'])} left for this run, "
                                       f"about {duration(left)} for all")
            yield event
        board.progress = None
    board.progress_text = ""


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def finish(board: Board, runner: Runner, session: str) -> None:
    """The board's last line: how many runs completed."""
    done = [v for v in board.runs if v.status == "completed"]
    stopped = runner.stop_requested(session)
    board.status = (f"{'Stopped' if stopped else 'Done'}: {len(done)} of {len(board.runs)} runs completed. "
                    "Predicted vs measured memory below; downloads at the bottom.")
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
    pre = [("pre-train (full)", pre[0][1], pre[0][2])]
    for cfg in configs:  # check every option before the long pre-training (the model is the base's shape)
        predict(base, cfg, setup, device)
    with runner.sequence(session):
        yield from run_sequence(runner, session, board, pre)
        pretrained = board.runs[-1]
        final = ((pretrained.summary or {}).get("final") or {}).get("final_dir")
        if pretrained.status != "completed" or not final:
            board.status = f"Pre-training {pretrained.status}; the fine-tuning runs were skipped."
            return
        items = [item for cfg in configs  # fine-tuning rates: gentler than pre-training's for GaLore
                 for item in plan_runs(runner, final, [cfg], setup, finetune_steps, lr or FINETUNE_LR[cfg.method],
                                       str(task), eval_every, seed, device, prefix="ft-")]
        yield from run_sequence(runner, session, board, items)
        finish(board, runner, session)


