"""`python -m lowrank.train --model MODEL --method METHOD [options] --out DIR`

Trains with one method, measures one steady-state step category by category, and writes
predicted beside measured:

    DIR/config.json      the model, method, setup and hyperparameters of the run
    DIR/metrics.jsonl    one line per step (flushed): loss, lr, grad_norm, tokens/s, step time,
                         peak memory of the step, eval loss when evaluated, GaLore layer gaps
    DIR/summary.json     {"predicted": estimator object, "measured": same shape, "comparison",
                          "final": losses and speed, "status": completed | stopped | failed}
    DIR/checkpoints/     checkpoint.pt (for --resume) every --save-every steps and at the end, and
                         step-N/: a PEFT adapter (LoRA/QLoRA) or the weights at step N
    DIR/final/           the trained model (PEFT adapter for LoRA/QLoRA), loadable later
    DIR/base/            for LoRA/QLoRA from a preset: the random base the adapter belongs to
    DIR/tokenizer/       the tokenizer the run used

The loop is written out in `train`: schedule, micro-batches, clipping, step, log, eval, save.
Memory is measured on every step (CUDA: the allocator's peak; CPU: live tensor storages), and in
full detail at --measure-step (default 2: the first step after the optimizer states exist).
--dry-run runs that step on fake tensors instead (lowrank/dryrun.py): a 7B model on a laptop.

Bad input exits with status 2 and one line before any work starts; running out of memory exits
with status 3 and a message holding the predicted peak and the device's capacity; SIGTERM
(the app's Stop) finishes the step in progress and ends the run as "stopped". Everything written
before a failure stays on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from estimator.config import LoRAConfig, MethodConfig, TrainSetup
from estimator.options import OneLineParser, add_training_arguments, as_flags, configs_from_args

from .checkpoints import load_checkpoint, save_base, save_checkpoint, save_final, save_weights
from .memory import StepMemory, cuda_measurement, device_capacity

# Learning rates that train each method well from scratch on the tiny presets (GaLore's paper
# uses 0.01 with scale 0.25 for pre-training; LoRA factors tolerate a high rate).
DEFAULT_LR = {"full": 1e-3, "lora": 2e-3, "qlora": 2e-3, "galore": 1e-2, "qgalore": 1e-2}
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OOM = 2, 1, 3


@dataclass(frozen=True)
class RunConfig:
    """Everything about a run that is not the method or the setup."""

    model: str
    out: str
    steps: int = 200
    lr: float | None = None
    warmup: int | None = None  # default: 10% of the steps, at most 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0
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
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a whole number ≥ 1")
        for name in ("eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name}={value!r} must be a whole number ≥ 0 (0 turns it off)")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr={self.lr!r} must be a number > 0")
        if self.warmup is not None and self.warmup < 0:
            problems.append(f"warmup={self.warmup!r} must be ≥ 0 steps")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay!r} must be ≥ 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"grad_clip={self.grad_clip!r} must be > 0 (or 0 on the command line for no clipping)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device={self.device!r} must be auto, cpu or cuda")
        if problems:
            raise ValueError("; ".join(problems))

    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup


def learning_rate(step: int, peak: float, cfg: RunConfig) -> float:
    """Linear warmup to `peak`, then cosine decay to `min_lr_ratio · peak` at the last step."""
    warmup = cfg.warmup_steps()
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but this machine has no CUDA GPU; use --device cpu")
    return torch.device(name)


def build_model(cfg: RunConfig, setup: TrainSetup, seed: int):
    """The model to train: a preset or config initialized at random (seeded), or a saved model."""
    from transformers import AutoModelForCausalLM

    from estimator.spec import load_config, preset_names

    source = cfg.model
    path = Path(os.path.expanduser(source))
    torch.manual_seed(seed)
    if source in preset_names() or path.suffix == ".json":
        config = load_config(source, cfg.trust_remote_code)
        config._attn_implementation = setup.attn_implementation
        return AutoModelForCausalLM.from_config(config, attn_implementation=setup.attn_implementation), False
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        config = load_config(source, cfg.trust_remote_code)  # a config-only folder: random weights
        return AutoModelForCausalLM.from_config(config, attn_implementation=setup.attn_implementation), False
    if not path.exists():
        from estimator.spec import hub_reachable

        if not hub_reachable():
            raise ValueError(f"model={source!r}: the Hugging Face hub cannot be reached; give a preset, "
                             "a local model folder, or connect to the internet")
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=setup.attn_implementation,
                                                 trust_remote_code=cfg.trust_remote_code)
    return model, True


def tokenizer_source_for(cfg: RunConfig) -> str | None:
    """The model's own tokenizer when it has one (a saved folder), else None: train a BPE."""
    from .data import find_tokenizer

    if cfg.tokenizer:
        return cfg.tokenizer
    path = Path(os.path.expanduser(cfg.model))
    return find_tokenizer(path) if path.is_dir() else None


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)  # never a half-written file


# ---------------------------------------------------------------------------------------- the run


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


def prepare_run(cfg: RunConfig, method: MethodConfig, setup: TrainSetup):
    """Validate everything, predict, load data and model, apply the method. Raises ValueError."""
    from estimator.estimate import estimate_spec
    from estimator.spec import load_spec

    from .data import load_data
    from .methods import prepare

    device = resolve_device(cfg.device)
    spec = load_spec(cfg.model, cfg.trust_remote_code)
    if spec.max_position and setup.seq_len > spec.max_position:
        raise ValueError(f"seq_len={setup.seq_len} is above {spec.name}'s maximum position {spec.max_position}; "
                         f"use --seq-len {spec.max_position} or less")
    estimate_spec(spec, method, setup, device=device.type)  # checks rank and targets before any work
    if setup.dtype == "fp16":
        raise ValueError("dtype='fp16' needs loss scaling, which this trainer does not do; use --dtype bf16 "
                         "(the same memory)")
    out = Path(cfg.out)
    data = load_data(cfg.data, tokenizer_source_for(cfg), spec.vocab_size, setup.seq_len, setup.batch_size,
                     cfg.seed, out.parent / ".cache", cfg.eval_fraction, spec.max_position, cfg.trust_remote_code)
    if data.kind == "jsonl" and not setup.padded:  # prompt/response rows are padded: masked attention
        setup = dataclasses.replace(setup, padded=True)
    predicted = estimate_spec(spec, method, setup, device=device.type)
    model, pretrained = build_model(cfg, setup, cfg.seed)
    model.to(device)
    lr = cfg.lr or DEFAULT_LR[method.method]
    prepared = prepare(model, method, setup, lr, cfg.weight_decay, cfg.grad_clip)
    return device, spec, predicted, data, prepared, pretrained, lr, setup


def galore_layers(optimizer) -> dict | None:
    info = getattr(optimizer, "layer_info", None)
    if info is None:
        return None
    rows = info()
    return {"names": [r["name"] for r in rows], "gap": [r["gap"] for r in rows],
            "svd_count": [r["svd_count"] for r in rows]}


@torch.no_grad()
def evaluate(model, data, batches: int, setup: TrainSetup, device: torch.device) -> float | None:
    from .step import autocast

    model.eval()
    losses = []
    for batch in data.eval_batches(batches):
        with autocast(setup, device.type):
            losses.append(float(model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss))
    model.train()
    return sum(losses) / len(losses) if losses else None


def train(cfg: RunConfig, method: MethodConfig, setup: TrainSetup, resume: bool = False,
          progress: bool = True) -> dict:
    """Run the training loop; returns the summary (also written to DIR/summary.json)."""
    from tqdm import tqdm

    from .report import compare_memory, memory_table
    from .step import measure_step, training_step

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    Stop.requested = False  # a new run starts un-stopped
    device, spec, predicted, data, prepared, pretrained, peak_lr, setup = prepare_run(cfg, method, setup)
    model, optimizer = prepared.model, prepared.optimizer
    data.tokenizer.save_pretrained(out / "tokenizer")
    base_name = cfg.model
    if isinstance(method, LoRAConfig) and not pretrained and not resume:
        base = out / "base"  # the random base a preset's adapter belongs to
        prepared_base_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        save_base(lambda: build_model(cfg, setup, cfg.seed)[0], base, data.tokenizer, prepared_base_dtype)
        base_name = str(base.resolve())
    config = {"model": cfg.model, "method": method.to_dict(), "setup": dataclasses.asdict(setup),
              "run": dataclasses.asdict(cfg), "lr": peak_lr, "device": str(device), "data": data.summary(),
              "params": {"total": spec.params_total, "trainable": prepared.trainable_parameters()},
              "base_model": base_name, "torch": torch.__version__}
    start = 0
    if resume:
        start = load_checkpoint(out, model, optimizer, data, device)
    else:
        write_json(out / "config.json", config)
        (out / "metrics.jsonl").write_text("")
    clip = cfg.grad_clip if prepared.clip_in_loop else None
    tokens_per_step = setup.batch_size * setup.seq_len * setup.grad_accum
    measured, status, message, last_loss, eval_loss = None, "completed", "", None, None
    elapsed = 0.0
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=method.method, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    try:
        with (out / "metrics.jsonl").open("a") as log:
            for step in range(start, cfg.steps):
                if Stop.requested:
                    status, message = "stopped", f"stopped at step {step}"
                    break
                lr = learning_rate(step, peak_lr, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batches = [{k: v.to(device) for k, v in next(data.train).items()} for _ in range(setup.grad_accum)]
                stats: dict = {}
                begin = time.perf_counter()
                # the steady-state step measured by category (a resumed run measures its first step)
                if step + 1 == cfg.measure_step or (measured is None and step == start and step >= cfg.measure_step):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    last_loss, step_measured = measure_step(model, optimizer, batches, setup, clip, stats)
                    measured = (cuda_measurement(step_measured, device) if device.type == "cuda"
                                else step_measured.to_dict())
                    step_peak = measured["peak_bytes"]
                else:
                    with StepMemory(device) as memory:
                        memory.watch(model, optimizer)
                        last_loss = training_step(model, optimizer, batches, setup, clip, stats=stats)
                    step_peak = memory.peak
                seconds = time.perf_counter() - begin
                elapsed += seconds
                line = {"step": step + 1, "loss": last_loss, "lr": lr, "grad_norm": stats.get("grad_norm"),
                        "tokens": tokens_per_step * (step + 1), "tokens_per_s": tokens_per_step / seconds,
                        "step_time_s": seconds, "memory_peak_bytes": step_peak}
                if step + 1 == cfg.steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                    eval_loss = evaluate(model, data, cfg.eval_batches, setup, device)
                    line["eval_loss"] = eval_loss
                layers = galore_layers(optimizer)
                if layers is not None:
                    line["layers"] = layers
                log.write(json.dumps(line) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{line['tokens_per_s']:.0f}")
                if not math.isfinite(last_loss):
                    status, message = "failed", f"the loss became {last_loss} at step {step + 1}; lower --lr"
                    break
                if cfg.save_every and (step + 1) % cfg.save_every == 0:
                    save_checkpoint(out, step + 1, model, optimizer, data, peak_lr)
                    save_weights(out / "checkpoints" / f"step-{step + 1}", model, method, base_name)
        steps_done = step + 1 if status != "stopped" else step
        if status != "failed":
            save_checkpoint(out, steps_done, model, optimizer, data, peak_lr)
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        capacity = device_capacity(device)
        status = "failed"
        message = (f"out of memory on {device}: the estimator predicted a peak of "
                   f"{predicted.total_bytes / 2**30:.2f} GiB and the device holds "
                   f"{(capacity or 0) / 2**30:.2f} GiB ({type(err).__name__}); lower --batch-size or --seq-len, "
                   f"or use --grad-checkpointing")
        steps_done = None
    finally:
        bar.close()
    final = None
    if status == "completed":
        final = save_final(out, model, method, data.tokenizer, base_name)
    comparison = compare_memory(predicted.to_dict(), measured) if measured else None
    summary = {
        "status": status, "message": message, "model": cfg.model, "method": method.method,
        "device": str(device), "device_capacity_bytes": device_capacity(device),
        "predicted": predicted.to_dict(), "measured": measured,
        "comparison": None if comparison is None else {"peak_error": comparison.peak_error,
                                                        "category_errors": comparison.category_errors,
                                                        "within_targets": comparison.ok,
                                                        "failures": comparison.failures},
        "final": {"steps": steps_done, "loss": last_loss, "eval_loss": eval_loss,
                  "tokens_per_s": (tokens_per_step * max(1, (steps_done or 0) - start)) / elapsed if elapsed else None,
                  "train_seconds": elapsed, "final_dir": str(final) if final else None},
    }
    write_json(out / "summary.json", summary)
    if progress and measured:
        print(f"\n{method.method} on {cfg.model}: predicted vs measured memory of one step\n"
              + memory_table(predicted.to_dict(), measured), file=sys.stderr)
    return summary


# ---------------------------------------------------------------------------------------- the CLI


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m lowrank.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="preset, config.json, model folder or hub id")
    parser.add_argument("--out", help="run folder (created)")
    add_training_arguments(parser)
    run = parser.add_argument_group("training")
    run.add_argument("--steps", type=int, default=200, help="optimizer steps")
    run.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method: "
                     + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    run.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of steps, ≤ 100)")
    run.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of the peak")
    run.add_argument("--weight-decay", type=float, default=0.0)
    run.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    run.add_argument("--eval-every", type=int, default=50, help="steps between eval losses (0: only at the end)")
    run.add_argument("--eval-batches", type=int, default=8)
    run.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--data", help=".txt or prompt/response .jsonl (default: the corpus shipped with Python)")
    run.add_argument("--tokenizer", help="tokenizer folder (default: the model's, or a BPE trained here)")
    run.add_argument("--eval-fraction", type=float, default=0.05)
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--measure-step", type=int, default=2, help="step measured by category (≥ 2: steady state)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.add_argument("--dry-run", action="store_true", help="one step on fake tensors: memory without memory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (runs started by the app)")
    run.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code")
    return parser


def configs_from_cli(args: argparse.Namespace) -> tuple[RunConfig, MethodConfig, TrainSetup]:
    method, setup = configs_from_args(args)
    if not args.model:
        raise ValueError("--model is required: a preset (e.g. tiny-llama-20m), a config.json, a folder or a hub id")
    if not args.out and not args.dry_run:
        raise ValueError("--out is required: the folder the run writes to (e.g. runs/lora-1)")
    cfg = RunConfig(model=args.model, out=args.out or "", steps=args.steps, lr=args.lr, warmup=args.warmup,
                    min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                    grad_clip=args.grad_clip or None, eval_every=args.eval_every, eval_batches=args.eval_batches,
                    save_every=args.save_every, seed=args.seed, data=args.data, tokenizer=args.tokenizer,
                    eval_fraction=args.eval_fraction, device=args.device, measure_step=args.measure_step,
                    trust_remote_code=args.trust_remote_code)
    return cfg, method, setup


def configs_from_run(out: Path) -> tuple[RunConfig, MethodConfig, TrainSetup]:
    """The configs a run folder was started with (for --resume)."""
    from estimator.config import method_config

    path = out / "config.json"
    if not path.exists():
        raise ValueError(f"--resume {out}: no config.json there; give the folder of an earlier run")
    saved = json.loads(path.read_text())
    method = dict(saved["method"])
    return (RunConfig(**saved["run"]), method_config(method.pop("method"), **method), TrainSetup(**saved["setup"]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    Stop.install()
    try:
        if args.resume:
            cfg, method, setup = configs_from_run(Path(args.resume))
            if args.steps != parser.get_default("steps"):
                cfg = dataclasses.replace(cfg, steps=args.steps)  # train further than planned
        else:
            cfg, method, setup = configs_from_cli(args)
        if args.dry_run:
            return dry_run_cli(cfg, method, setup)
        summary = train(cfg, method, setup, resume=bool(args.resume), progress=not args.no_progress)
    except ValueError as err:
        parser.error(as_flags(str(err), args.method or ""))
    except Exception as err:  # a crash: the message on one line, the traceback in the run folder
        out = Path(getattr(args, "out", None) or args.resume or ".")
        if out.is_dir():
            (out / "error.txt").write_text(traceback.format_exc())
        print(f"python -m lowrank.train: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    if summary["status"] == "failed":
        print(f"python -m lowrank.train: {summary['message']}", file=sys.stderr)
        return EXIT_OOM if "out of memory" in summary["message"] else EXIT_FAILED
    return 0


def dry_run_cli(cfg: RunConfig, method: MethodConfig, setup: TrainSetup) -> int:
    """--dry-run: the real step on fake tensors, beside the estimate (written to --out if given)."""
    from estimator.estimate import estimate

    from .dryrun import dry_run, resolve_device
    from .report import compare_memory, memory_table

    device = resolve_device("cuda" if cfg.device in ("auto", "cuda") else "cpu").type  # fake CUDA needs CUDA
    predicted = estimate(cfg.model, method, setup, device=device, trust_remote_code=cfg.trust_remote_code)
    measured = dry_run(cfg.model, method, setup, device=device)
    print(f"{method.method} on {cfg.model}, one step on fake {device} tensors beside the estimate:")
    print(memory_table(predicted.to_dict(), measured.to_dict()))
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        check = compare_memory(predicted.to_dict(), measured.to_dict())
        write_json(out / "summary.json", {"status": "dry-run", "model": cfg.model, "method": method.method,
                                          "device": device, "predicted": predicted.to_dict(),
                                          "measured": measured.to_dict(),
                                          "comparison": {"peak_error": check.peak_error,
                                                         "within_targets": check.ok, "failures": check.failures}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

