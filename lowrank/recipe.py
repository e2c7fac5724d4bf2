"""The training recipe as named steps — set up, one step, evaluate, save, resume — and `train`,
which reads them in order. `python -m lowrank.train`, the app's worker and the benchmarks run it.

    spec = RunSpec("tiny-llama-20m", GaLoreConfig(rank=128), TrainSetup(batch_size=8, seq_len=256),
                   out="runs/galore", steps=300)
    summary = train(spec)                        # everything below, in order
    session = start_session(spec)                # check, predict, load data and model, apply the method
    first = begin_run(session)                   # config.json, empty metrics.jsonl (or resume_run: the checkpoint)
    for result in run_steps(session, first):     # one StepResult per optimizer step
        evaluate(session); save(session, result.step)
    finish(session, outcome)                     # final/, summary.json, the closing table

A run folder holds:

    config.json      the RunSpec (model, method, setup, run options) and what the run found
    metrics.jsonl    one line per step (flushed): loss, lr, grad_norm, tokens/s, step time, the
                     step's peak memory, eval loss when evaluated, GaLore layer gaps
    summary.json     {"predicted", "measured" (same shape), "comparison", "final", "status",
                     "load_peak_bytes" (measured; predicted["load"] beside it)}
    checkpoints/     checkpoint.pt (what --resume needs: every --checkpoint-minutes and at the end,
                     written atomically) and step-N/ (a usable snapshot every --save-every steps)
    final/           the trained model (a PEFT adapter for LoRA/QLoRA)
    base/            LoRA/QLoRA from a preset: the random base the adapter belongs to
    tokenizer/       the tokenizer the run used

Memory is measured on every step (CUDA: the allocator's peak; CPU: live tensor storages), and by
category at `measure_step` (default 2: the first step after the optimizer states exist). The load
— building the model, casting it on the host, moving it, the method's own work (lowrank/load.py)
— is measured the same way before the first step (CUDA: the allocator's peak since the process
started, read before the first step resets it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from estimator.config import MethodConfig, TrainSetup, method_config
from estimator.options import Option, flags_for, option_flags

from .checkpoints import load_checkpoint, save_base, save_checkpoint, write_atomically
from .device import device_capacity, resolve_device
from .distributed import Parallel
from .load import LoadMemory, place
from .memory import StepMemory, cuda_measurement
from .methods import Prepared, prepare, save_model
from .step import autocast, measure_step, training_step

# Learning rates that train each method well from scratch on the tiny presets (GaLore's paper
# uses 0.01 with scale 0.25 for pre-training; LoRA factors tolerate a high rate).
DEFAULT_LR = {"full": 1e-3, "lora": 2e-3, "qlora": 2e-3, "galore": 1e-2, "qgalore": 1e-2}
OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)


# ------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class RunSpec:
    """One training run, whole: what the CLI parses, the worker launches and config.json keeps."""

    model: str
    method: MethodConfig
    setup: TrainSetup = field(default_factory=TrainSetup)
    out: str = ""
    steps: int = 200
    lr: float | None = None  # default: DEFAULT_LR of the method
    warmup: int | None = None  # default: 10% of the steps, at most 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0
    checkpoint_minutes: float = 5.0
    seed: int = 0
    data: str | None = None
    tokenizer: str | None = None
    eval_fraction: float = 0.05
    device: str = "auto"
    measure_step: int = 2
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "eval_batches", "measure_step"):
            value = getattr(self, name)
            if not _whole(value) or value < 1:
                problems.append(f"{name}={value!r} must be a whole number ≥ 1")
        for name in ("eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not _whole(value) or value < 0:
                problems.append(f"{name}={value!r} must be a whole number ≥ 0 (0 turns it off)")
        if self.lr is not None and not (_number(self.lr) and 0 < self.lr < math.inf):
            problems.append(f"lr={self.lr!r} must be a number > 0")
        if self.warmup is not None and not (_whole(self.warmup) and self.warmup >= 0):
            problems.append(f"warmup={self.warmup!r} must be a whole number of steps ≥ 0")
        if not (_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            problems.append(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not (_number(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            problems.append(f"weight_decay={self.weight_decay!r} must be ≥ 0")
        if self.grad_clip is not None and not (_number(self.grad_clip) and 0 < self.grad_clip < math.inf):
            problems.append(f"grad_clip={self.grad_clip!r} must be > 0 (or 0 on the command line for no clipping)")
        if not (_number(self.checkpoint_minutes) and 0 <= self.checkpoint_minutes < math.inf):
            problems.append(f"checkpoint_minutes={self.checkpoint_minutes!r} must be ≥ 0 (0: only at the end)")
        if not (_number(self.eval_fraction) and 0 <= self.eval_fraction < 1):
            problems.append(f"eval_fraction={self.eval_fraction!r} must be in [0, 1)")
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append("model is empty; give a preset (e.g. tiny-llama-20m), a config.json, a folder or a hub id")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            problems.append(f"device={self.device!r} must be auto, cpu or cuda")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def peak_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.method.method]

    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    def flags(self) -> list[str]:
        """The command line that rebuilds this spec (`python -m lowrank.train` parses it back):
        the method's and the setup's options, and every run option that differs from its default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        values = {**self.run_options(), "grad_clip": self.grad_clip or 0}  # --grad-clip 0: no clipping
        head = ["--model", self.model] + (["--out", self.out] if self.out else [])
        return head + flags_for(self.method, self.setup) + option_flags(RUN_OPTIONS, values, defaults)

    def run_options(self) -> dict[str, Any]:
        """Everything but the method and the setup (config.json's "run")."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("method", "setup")}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method.to_dict(), "setup": dataclasses.asdict(self.setup),
                "run": self.run_options()}

    @classmethod
    def from_dict(cls, saved: dict, **changes: Any) -> RunSpec:
        """The spec a config.json recorded (`to_dict`), with `changes` (e.g. out, steps) applied."""
        method = dict(saved["method"])
        known = {f.name for f in dataclasses.fields(cls)}
        run = {k: v for k, v in saved["run"].items() if k in known}
        return cls(**{**run, "method": method_config(method.pop("method"), **method),
                      "setup": TrainSetup(**saved["setup"]), **changes})


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


# The run options on the command line (the method and setup options are estimator/options.py's);
# a table, so its rows look alike (the duplicates tool reports their shape).
RUN_OPTIONS = (
    Option("--steps", "steps", int, "optimizer steps"),
    Option("--lr", "lr", float, "peak learning rate (default per method: "
           + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")"),
    Option("--warmup", "warmup", int, "warmup steps (default 10%% of steps, at most 100)"),
    Option("--min-lr-ratio", "min_lr_ratio", float, "final lr as a share of the peak (cosine decay)"),
    Option("--weight-decay", "weight_decay", float, "decoupled weight decay"),
    Option("--grad-clip", "grad_clip", float, "max gradient norm (0: no clipping)"),
    Option("--eval-every", "eval_every", int, "steps between eval losses (0: only at the end)"),
    Option("--eval-batches", "eval_batches", int, "batches of the held-out split per evaluation"),
    Option("--save-every", "save_every", int, "steps between usable snapshots in checkpoints/step-N (0: none)"),
    Option("--checkpoint-minutes", "checkpoint_minutes", float,
           "minutes between resume checkpoints (0: only at the end)"),
    Option("--seed", "seed", int, "seed of the model's initialization and the data order"),
    Option("--data", "data", str, ".txt or prompt/response .jsonl (default: the corpus shipped with Python)"),
    Option("--tokenizer", "tokenizer", str, "tokenizer folder (default: the model's, or a BPE trained here)"),
    Option("--eval-fraction", "eval_fraction", float, "share of the data held out for evaluation"),
    Option("--device", "device", str, "auto, cpu or cuda"),
    Option("--measure-step", "measure_step", int, "step measured by category (≥ 2: steady state)"),
    Option("--trust-remote-code", "trust_remote_code", bool, "allow a hub model's own code"),
)


def learning_rate(step: int, peak: float, spec: RunSpec) -> float:
    """Linear warmup to `peak`, then cosine decay to `min_lr_ratio · peak` at the last step."""
    warmup = spec.warmup_steps()
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return peak * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Stop:
    """SIGTERM/SIGINT set a flag; the loop finishes its step and ends the run as "stopped"."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(signum, frame):
            cls.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (tests call train() directly)
                signal.signal(sig, handler)


# ------------------------------------------------------------------------------------ set up
@dataclass
class Session:
    """A run while it trains: its spec, the device, the data and the prepared model."""

    spec: RunSpec
    setup: TrainSetup  # the spec's, marked padded for prompt/response data
    device: torch.device
    data: Any  # lowrank.data.Data
    prepared: Prepared
    predicted: Any = None  # estimator.estimate.Estimate for this exact run (per GPU)
    params_total: int | None = None
    pretrained: bool = False  # loaded from saved weights (a LoRA adapter then needs no base/)
    parallel: Parallel | None = None  # this rank's place in a data-parallel job (torchrun)
    load_peak_bytes: int | None = None  # measured: building the model and preparing it (lowrank/load.py)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder; the other ranks train, measure and report to it."""
        return self.parallel is None or self.parallel.is_main

    @property
    def out(self) -> Path:
        return Path(self.spec.out)

    @property
    def tokens_per_step(self) -> int:
        return self.setup.batch_size * self.setup.seq_len * self.setup.grad_accum

    @property
    def base_name(self) -> str:
        """The model a LoRA adapter of this run belongs to."""
        if self.prepared.method.method in ("lora", "qlora") and not self.pretrained and self.spec.out:
            return str((self.out / "base").resolve())
        return self.spec.model


def build_model(spec: RunSpec, setup: TrainSetup) -> tuple[torch.nn.Module, bool]:
    """The model to train and whether it holds saved weights: a preset, config.json or config-only
    folder initialized at random (seeded), or a saved model."""
    from transformers import AutoModelForCausalLM

    from estimator.spec import attention_fallback, hub_reachable, load_config, preset_names

    source = spec.model
    config = load_config(source, spec.trust_remote_code)
    attn, _ = attention_fallback(config, setup.attn_implementation)  # eager where the family has no SDPA
    path = Path(os.path.expanduser(source))
    torch.manual_seed(spec.seed)
    config_only = path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin"))
    if source in preset_names() or path.suffix == ".json" or config_only:
        config._attn_implementation = attn
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn), False
    if not path.exists() and not hub_reachable():
        raise ValueError(f"model={source!r}: the Hugging Face hub cannot be reached; give a preset, "
                         "a local model folder, or connect to the internet")
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn,
                                                 trust_remote_code=spec.trust_remote_code)
    return model, True


def start_session(spec: RunSpec) -> Session:
    """Check everything before any work, predict, load the data and the model, apply the method.

    Every problem is a ValueError naming the option and the fix.
    """
    from estimator.estimate import estimate_spec
    from estimator.spec import load_spec

    from .data import find_tokenizer, load_data

    device = resolve_device(spec.device)
    parallel = Parallel.from_env(spec.setup.shard, device, spec.setup.cpu_offload)
    setup = spec.setup
    if parallel is None and setup.gpus > 1:
        raise ValueError(f"gpus={setup.gpus} trains one process per GPU: launch it with torchrun "
                         f"--nproc-per-node {setup.gpus} -m lowrank.train ... (or --gpus 1)")
    if parallel is not None:
        if setup.gpus != parallel.world:
            raise ValueError(f"gpus={setup.gpus} but torchrun started {parallel.world} processes; give --gpus "
                             f"{parallel.world} or leave it out")
        device = parallel.device
    model_spec = load_spec(spec.model, spec.trust_remote_code)
    if model_spec.max_position and setup.seq_len > model_spec.max_position:
        raise ValueError(f"seq_len={setup.seq_len} is above {model_spec.name}'s maximum position "
                         f"{model_spec.max_position}; use --seq-len {model_spec.max_position} or less")
    estimate_spec(model_spec, spec.method, setup, device=device.type)  # checks rank and targets against the model
    if setup.dtype == "fp16":
        raise ValueError("dtype='fp16' needs loss scaling, which this trainer does not do; use --dtype bf16 "
                         "(the same memory)")
    path = Path(os.path.expanduser(spec.model))
    tokenizer = spec.tokenizer or (find_tokenizer(path) if path.is_dir() else None)
    cache = Path(spec.out).parent / ".cache" if spec.out else Path(".cache")
    data = load_data(spec.data, tokenizer, model_spec.vocab_size, setup.seq_len, setup.batch_size, spec.seed,
                     cache, spec.eval_fraction, model_spec.max_position, spec.trust_remote_code, packed=setup.packed)
    if data.kind == "jsonl" and not setup.packed:  # prompt/response rows are padded: attention takes the masked path
        setup = dataclasses.replace(setup, padded=True)
    predicted = estimate_spec(model_spec, spec.method, setup, device=device.type)
    prepared, pretrained, load_peak = load_model(spec, setup, device, parallel)
    return Session(spec, setup, device, data, prepared, predicted, model_spec.params_total, pretrained, parallel,
                   load_peak_bytes=load_peak)


def load_model(spec: RunSpec, setup: TrainSetup, device: torch.device,
               parallel: Parallel | None = None) -> tuple[Prepared, bool, int]:
    """Build (or load) the model, cast it on the host, move it to `device` and apply the method
    (lowrank/load.py): the prepared model, whether it holds saved weights, and the load's
    measured peak (CUDA: the allocator's peak so far; CPU: live storages)."""
    with LoadMemory(device) as load:
        model, pretrained = build_model(spec, setup)
        load.watch(model)
        prepared = prepare(place(model, spec.method, setup, device, parallel), spec.method, setup, spec.peak_lr,
                           spec.weight_decay, spec.grad_clip, parallel)
    return prepared, pretrained, load.peak


def session_for_model(spec: RunSpec, model: torch.nn.Module, data, device: str = "cpu") -> Session:
    """A session over a model built in memory (benchmarks that change a model before training)."""
    prepared = prepare(model.to(device), spec.method, spec.setup, spec.peak_lr, spec.weight_decay, spec.grad_clip)
    return Session(spec, spec.setup, torch.device(device), data, prepared)


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str) + "\n"))


def begin_run(session: Session) -> int:
    """A new run folder: the tokenizer, the random base (LoRA on a preset), config.json and an
    empty metrics.jsonl (rank 0 writes). Returns the first step (0)."""
    if not session.is_main:
        return 0
    out, spec = session.out, session.spec
    out.mkdir(parents=True, exist_ok=True)
    session.data.tokenizer.save_pretrained(out / "tokenizer")
    if session.base_name != spec.model:  # the random base a preset's adapter belongs to
        dtype = next(p for p in session.prepared.model.parameters() if p.is_floating_point()).dtype
        save_base(lambda: build_model(spec, session.setup)[0], out / "base", session.data.tokenizer, dtype)
    write_json(out / "config.json", {**spec.to_dict(), "lr": spec.peak_lr, "device": str(session.device),
                                     "data": session.data.summary(), "base_model": session.base_name,
                                     "params": {"total": session.params_total,
                                                "trainable": session.prepared.trainable_parameters()},
                                     "torch": torch.__version__})
    (out / "metrics.jsonl").write_text("")
    return 0


def resume_run(session: Session) -> int:
    """Continue from the run folder's checkpoint: model, optimizer, data position and RNG; the
    metrics of steps after the checkpoint (written before a kill) are dropped, so each step
    appears once. Returns the first step to run."""
    first = load_checkpoint(session.out, session.prepared, session.data, session.device)
    if session.is_main:
        metrics = session.out / "metrics.jsonl"
        kept = [line for line in read_metrics(metrics) if line["step"] <= first]
        write_atomically(metrics, lambda tmp: tmp.write_text("".join(json.dumps(line) + "\n" for line in kept)))
        if first >= session.spec.steps:
            print(f"{session.out} already ran {first} steps (--steps {session.spec.steps}): nothing to train; "
                  f"give --steps above {first} to continue", file=sys.stderr)
    return first


def read_metrics(path: Path) -> list[dict]:
    """The metrics lines of a run, each step once (the last line written for it), in step order;
    unreadable lines are skipped."""
    by_step: dict[int, dict] = {}
    with contextlib.suppress(OSError):
        for raw in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
                line = json.loads(raw)
                if isinstance(line, dict) and _whole(line.get("step")):
                    by_step[line["step"]] = line
    return [by_step[step] for step in sorted(by_step)]


# ------------------------------------------------------------------------------------ one step
@dataclass
class StepResult:
    """One optimizer step as metrics.jsonl records it."""

    step: int  # 1-based: steps done after this one
    loss: float
    lr: float
    grad_norm: float | None
    seconds: float
    tokens: int  # tokens seen so far
    step_tokens: int  # tokens in this step (all micro-batches)
    memory_peak_bytes: int
    measured: dict | None = None  # the breakdown by category, on the measured step (the largest rank's)
    layers: dict | None = None  # GaLore: per-layer gaps and SVD counts
    eval_loss: float | None = None
    measured_ranks: list[dict] | None = None  # several ranks: each one's measurement, in rank order
    memory_peak_ranks: list[int] | None = None  # several ranks: each one's peak this step, in rank order

    def line(self) -> dict:
        out = {"step": self.step, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
               "tokens": self.tokens, "tokens_per_s": self.tokens_per_s, "step_time_s": self.seconds,
               "memory_peak_bytes": self.memory_peak_bytes}
        if self.memory_peak_ranks is not None:
            out["memory_peak_ranks"] = self.memory_peak_ranks
        if self.eval_loss is not None:
            out["eval_loss"] = self.eval_loss
        if self.layers is not None:
            out["layers"] = self.layers
        return out

    @property
    def tokens_per_s(self) -> float:
        return self.step_tokens / self.seconds


def run_step(session: Session, step: int, measure: bool = False) -> StepResult:
    """Step `step` (0-based): the scheduled lr, the next micro-batches, one update, its memory
    (by category when `measure`)."""
    spec, device, prepared, parallel = session.spec, session.device, session.prepared, session.parallel
    lr = learning_rate(step, spec.peak_lr, spec)
    for group in prepared.optimizer.param_groups:
        group["lr"] = lr
    batches = [next(session.data.train) for _ in range(session.setup.grad_accum)]
    if parallel is not None:  # the same global micro-batches on every rank: each trains its rows
        batches = [parallel.local_batch(batch) for batch in batches]
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    begin_time = time.perf_counter()
    measured = None
    if measure:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        outcome, tracked = measure_step(prepared, batches, session.setup)
        measured = cuda_measurement(tracked, device) if device.type == "cuda" else tracked.to_dict()
        peak = measured["peak_bytes"]
    else:
        with StepMemory(device) as memory:
            memory.watch(prepared.model, prepared.state_tensors())
            outcome = training_step(prepared, batches, session.setup)
        peak = memory.peak
    ranks = peaks = None
    if parallel is not None:  # the largest rank's memory is the job's
        peaks = parallel.gather_ints(peak)
        peak = max(peaks)
        if measured is not None:
            ranks = parallel.gather(measured)
            measured = max(ranks, key=lambda m: m["peak_bytes"])
    return StepResult(step + 1, outcome.loss, lr, outcome.grad_norm, time.perf_counter() - begin_time,
                      session.tokens_per_step * (step + 1), session.tokens_per_step, peak, measured,
                      prepared.layer_info(), measured_ranks=ranks, memory_peak_ranks=peaks)


def run_steps(session: Session, first: int = 0) -> Iterator[StepResult]:
    """Steps `first` … `spec.steps - 1`, until a Stop. The step measured by category is
    `measure_step`, or the first one of a resumed run that started past it."""
    spec = session.spec
    for step in range(first, spec.steps):
        stop = Stop.requested if session.parallel is None else bool(session.parallel.max(int(Stop.requested)))
        if stop:  # every rank stops at the same step (a signal may reach them a moment apart)
            return
        yield run_step(session, step, measure=step + 1 == spec.measure_step
                       or (step == first and step >= spec.measure_step))


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches, setup: TrainSetup,
                   device: torch.device | None = None) -> float | None:
    """The mean loss over `batches` in eval mode (None without batches), computed on `device`
    (default: the parameters'; a rank's device under CPU offload, whose shards stay on the host)."""
    device = device or next(model.parameters()).device
    model.eval()
    losses = []
    for batch in batches:
        with autocast(setup, device.type):
            losses.append(float(model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss))
    model.train()
    return sum(losses) / len(losses) if losses else None


def evaluate(session: Session) -> float | None:
    """The eval loss on the held-out split (`eval_batches` batches)."""
    return evaluate_model(session.prepared.model, session.data.eval_batches(session.spec.eval_batches), session.setup,
                          session.prepared.device)


def save_snapshot(session: Session, step: int) -> None:
    """checkpoints/step-N: a usable model (a PEFT adapter for LoRA/QLoRA)."""
    save_model(session.prepared, session.out / "checkpoints" / f"step-{step}", session.base_name)


def save(session: Session, step: int) -> None:
    """checkpoints/checkpoint.pt: what --resume needs after `step` steps."""
    save_checkpoint(session.out, step, session.prepared, session.data, session.spec.peak_lr)


# ------------------------------------------------------------------------------------ the run
@dataclass
class Outcome:
    """How the run is going, then how it ended: status, the last step, the measurement."""

    first: int
    status: str = "completed"
    message: str = ""
    last: StepResult | None = None
    eval_loss: float | None = None
    measured: dict | None = None
    measured_ranks: list[dict] | None = None
    seconds: float = 0.0
    saved_at: float = field(default_factory=time.monotonic)

    @property
    def steps(self) -> int:
        return self.last.step if self.last else self.first

    def add(self, result: StepResult) -> None:
        self.last, self.seconds = result, self.seconds + result.seconds
        self.eval_loss = result.eval_loss if result.eval_loss is not None else self.eval_loss
        self.measured = result.measured or self.measured
        self.measured_ranks = result.measured_ranks or self.measured_ranks
        if not math.isfinite(result.loss):
            self.status, self.message = "failed", f"the loss became {result.loss} at step {result.step}; lower --lr"

    def ended(self, spec: RunSpec) -> None:
        if self.status == "completed" and self.steps < spec.steps:
            self.status, self.message = "stopped", f"stopped at step {self.steps}"

    def out_of_memory(self, session: Session, err: BaseException) -> None:
        capacity = device_capacity(session.device) or 0
        self.status = "failed"
        self.message = (f"out of memory on {session.device}: the estimator predicted a peak of "
                        f"{session.predicted.total_bytes / 2**30:.2f} GiB and the device holds "
                        f"{capacity / 2**30:.2f} GiB ({type(err).__name__}); lower --batch-size or --seq-len, "
                        f"or use --grad-checkpointing")


def checkpoint_due(session: Session, outcome: Outcome) -> bool:
    """Is a resume checkpoint due (every `checkpoint_minutes` of training)? Ranks decide together:
    saving is collective, and their clocks differ."""
    minutes = session.spec.checkpoint_minutes
    due_here = bool(minutes) and time.monotonic() - outcome.saved_at > 60 * minutes
    return due_here if session.parallel is None else bool(session.parallel.max(int(due_here)))


def record_failure(out: str | Path, message: str, rank: int = 0) -> None:
    """A failed rank's message as the run's summary.json — the first failure of a job wins (the
    other ranks fail next, only because it left). Metrics written so far stay."""
    out = Path(out)
    if not out.is_dir():
        return
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job is not None:
        try:
            os.close(os.open(out / f".failed-{job}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    previous = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((out / "summary.json").read_text())
    previous = previous if isinstance(previous, dict) and previous.get("status") == "failed" and job is None else {}
    where = f"rank {rank}: " if job is not None else ""
    write_json(out / "summary.json", {**previous, "status": "failed", "message": f"{where}{message}"})


class MetricsLog:
    """metrics.jsonl, appended and flushed a line per step by rank 0 (the other ranks write nothing)."""

    def __init__(self, session: Session) -> None:
        self.path = session.out / "metrics.jsonl" if session.is_main else None
        self.file = None

    def __enter__(self) -> MetricsLog:
        if self.path is not None:
            self.file = self.path.open("a")
        return self

    def write(self, result: StepResult) -> None:
        if self.file is not None:
            self.file.write(json.dumps(result.line()) + "\n")
            self.file.flush()

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


def due(every: int, step: int, last: int | None = None) -> bool:
    """Is `step` (1-based) one of every `every` steps — or the last one?"""
    return step == last or bool(every) and step % every == 0


def train(spec: RunSpec, resume: bool = False, progress: bool = True) -> dict:
    """Set up, run the loop (evaluation, snapshots and checkpoints on schedule), finish."""
    from tqdm import tqdm

    Stop.requested = False  # a new run starts un-stopped
    session = start_session(spec)
    first = resume_run(session) if resume else begin_run(session)
    outcome = Outcome(first)
    bar = tqdm(total=spec.steps, initial=first, disable=not (progress and session.is_main), desc=spec.method.method,
               unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        with MetricsLog(session) as log:
            for result in run_steps(session, first):
                if due(spec.eval_every, result.step, last=spec.steps):
                    result.eval_loss = evaluate(session)
                log.write(result)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{result.tokens_per_s:.0f}")
                outcome.add(result)
                if outcome.status == "failed":
                    break
                if due(spec.save_every, result.step):
                    save_snapshot(session, result.step)
                if checkpoint_due(session, outcome):
                    save(session, result.step)
                    outcome.saved_at = time.monotonic()
        outcome.ended(spec)
        if outcome.status != "failed":
            save(session, outcome.steps)
    except OUT_OF_MEMORY as err:
        outcome.out_of_memory(session, err)
    finally:
        bar.close()
    return finish(session, outcome, progress)


def finish(session: Session, outcome: Outcome, progress: bool = False) -> dict:
    """The final model (a completed run), summary.json, and the closing table on the terminal."""
    from .report import compare_memory, comparison_table

    final = None
    if outcome.status == "completed":
        final = save_model(session.prepared, session.out / "final", session.base_name, final=True)
        if session.is_main:
            session.data.tokenizer.save_pretrained(final)
    predicted = session.predicted.to_dict()
    measured = outcome.measured
    if measured is not None and session.load_peak_bytes is not None:
        measured = {**measured, "load_peak_bytes": session.load_peak_bytes}
    done = outcome.steps - outcome.first
    summary = {
        "status": outcome.status, "message": outcome.message, "model": session.spec.model,
        "method": session.spec.method.method, "device": str(session.device), "gpus": session.setup.gpus,
        "shard": session.setup.shard, "measured_ranks": outcome.measured_ranks,
        "device_capacity_bytes": device_capacity(session.device), "predicted": predicted, "measured": measured,
        "load_peak_bytes": session.load_peak_bytes,  # measured: building and preparing (predicted["load"])
        "comparison": compare_memory(predicted, measured).to_dict() if measured else None,
        "final": {"steps": outcome.steps,
                  "loss": outcome.last.loss if outcome.last else None, "eval_loss": outcome.eval_loss,
                  "tokens_per_s": session.tokens_per_step * done / outcome.seconds if outcome.seconds else None,
                  "train_seconds": outcome.seconds, "final_dir": str(final) if final else None},
    }
    if not session.is_main:
        return summary
    write_json(session.out / "summary.json", summary)
    if progress and measured:
        per_gpu = f" per GPU ({session.setup.gpus} GPUs, --shard {session.setup.shard}; the largest rank)" \
            if session.parallel is not None else ""
        ranks = [f"rank {i}: {m['peak_bytes'] / 2**20:,.2f} MiB in {m['phase']}"
                 for i, m in enumerate(outcome.measured_ranks or [])]
        print(f"\n{session.spec.method.method} on {session.spec.model}: predicted vs measured memory of one step"
              f"{per_gpu}\n" + comparison_table(predicted, measured) + "".join("\n" + r for r in ranks),
              file=sys.stderr)
    return summary
