"""`python -m lowrank.train`: the command line of the training recipe (lowrank/recipe.py).

    python -m lowrank.train --model MODEL --method METHOD [options] --out DIR   # train
    python -m lowrank.train --resume DIR [--steps N]                            # continue DIR's run in DIR
    python -m lowrank.train --model MODEL --method METHOD [options] --dry-run   # one step on fake tensors

Trains with one method, measures one steady-state step category by category, and writes
predicted beside measured into the run folder (its layout: lowrank/recipe.py). `--dry-run` runs
that step on fake tensors instead (lowrank/dryrun.py): a 7B model "measured" on a laptop.

Bad input exits with status 2 and one line before any work starts; running out of memory exits
with status 3 and a message holding the predicted peak and the device's capacity; SIGTERM
(the app's Stop) finishes the step in progress and ends the run as "stopped". Everything written
before a failure stays on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from estimator.arguments import OneLineParser, add_options, add_training_arguments, configs_from_args, given
from estimator.config import METHODS
from estimator.options import METHOD_OPTIONS, SETUP_OPTIONS, as_flags

from .recipe import RUN_OPTIONS, RunSpec, Stop, record_failure, train, write_json

EXIT_FAILED, EXIT_OOM = 1, 3  # bad input exits 2 (argparse's status, OneLineParser.error)
RESUMABLE = ("steps", "eval_every", "eval_batches", "save_every", "checkpoint_minutes", "device")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m lowrank.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="preset, config.json, model folder or hub id")
    parser.add_argument("--out", help="run folder (created)")
    add_training_arguments(parser, method_required=False)
    add_options(parser.add_argument_group("training"), RUN_OPTIONS)
    run = parser.add_argument_group("what to do")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint, in DIR")
    run.add_argument("--dry-run", action="store_true", help="one step on fake tensors: memory without memory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (runs started by the app)")
    return parser


def run_values(args: argparse.Namespace) -> dict:
    """The run options given on the command line (--grad-clip 0: no clipping)."""
    values = given(args, RUN_OPTIONS)
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    return values


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec the command line describes; ValueError names the flag and the fix."""
    if args.resume:
        return resumed_spec(args)
    if not args.method:
        raise ValueError(f"--method is required: one of {', '.join(METHODS)} (or --resume DIR to continue a run)")
    method, setup = configs_from_args(args)
    if not args.model:
        raise ValueError("--model is required: a preset (e.g. tiny-llama-20m), a config.json, a folder or a hub id")
    if not args.out and not args.dry_run:
        raise ValueError("--out is required: the folder the run writes to (e.g. runs/lora-1)")
    return RunSpec(model=args.model, method=method, setup=setup, out=args.out or "", **run_values(args))


def resumed_spec(args: argparse.Namespace) -> RunSpec:
    """The spec recorded in DIR/config.json, writing into DIR, with the options that may change."""
    out = Path(args.resume)
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text())
        spec = RunSpec.from_dict(saved, out=str(out))
    except OSError:
        raise ValueError(f"--resume {out}: no config.json there; give the folder of an earlier run") from None
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"--resume {out}: config.json does not describe a run ({type(err).__name__}: {err}); "
                         "give the folder of an earlier run") from None
    fixed = [o.flag for o in (*METHOD_OPTIONS, *SETUP_OPTIONS) if getattr(args, o.dest) is not None
             and o.field not in ("gpus", "shard", "cpu_offload")]  # the checkpoint is whole: any ranks resume it
    fixed += [o.flag for o in RUN_OPTIONS if o.field not in RESUMABLE and getattr(args, o.dest) is not None]
    fixed += [flag for flag, value in (("--model", args.model), ("--out", args.out)) if value]
    if args.method and args.method != spec.method.method:
        fixed.append("--method")
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change when resuming {out}; a resumed run keeps its model, "
                         f"method, setup and schedule (it may change {', '.join('--' + r.replace('_', '-') for r in RESUMABLE)}"
                         ", and run on another number of GPUs or strategy)")
    changes = {k: v for k, v in run_values(args).items() if k in RESUMABLE}
    if args.gpus is not None or args.shard is not None or args.cpu_offload is not None:
        gpus = spec.setup.gpus if args.gpus is None else args.gpus
        shard = args.shard or (spec.setup.shard if gpus > 1 else "none")  # one process shards nothing
        offload = spec.setup.cpu_offload and shard in ("gradients", "full") if args.cpu_offload is None \
            else args.cpu_offload  # kept while FSDP shards
        changes["setup"] = dataclasses.replace(spec.setup, gpus=gpus, shard=shard, cpu_offload=offload)
    return RunSpec.from_dict(saved, out=str(out), **changes)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if args.gpus is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.gpus = int(os.environ["WORLD_SIZE"])  # under torchrun: one GPU (rank) per process
    Stop.install()
    try:
        spec = spec_from_args(args)
        if args.dry_run:
            return dry_run_cli(spec)
        summary = train(spec, resume=bool(args.resume), progress=not args.no_progress)
    except ValueError as err:
        parser.error(as_flags(" ".join(str(err).split()), args.method or "", RUN_OPTIONS))
    except Exception as err:  # a crash: the message on one line, the traceback in the run folder
        out = Path(args.out or args.resume or ".")
        if out.is_dir():
            (out / ("error.txt" if rank == 0 else f"error-rank-{rank}.txt")).write_text(traceback.format_exc())
            record_failure(out, f"{type(err).__name__}: {err}", rank)
        print(f"python -m lowrank.train: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    if summary["status"] == "failed":
        if rank != 0:  # rank 0 wrote its own summary; another rank's failure is its message
            record_failure(spec.out, summary["message"], rank)
        print(f"python -m lowrank.train: {summary['message']}", file=sys.stderr)
        return EXIT_OOM if "out of memory" in summary["message"] else EXIT_FAILED
    return 0


def dry_run_cli(spec: RunSpec) -> int:
    """--dry-run: the real step on fake tensors, beside the estimate (summary.json in --out if given)."""
    from estimator.estimate import estimate

    from .device import FAKE_CUDA_FALLBACK, resolve_device
    from .dryrun import dry_run
    from .report import compare_memory, comparison_table

    device = resolve_device(spec.device, fake=True).type
    if spec.device.startswith("cuda") and device != "cuda":
        print(f"note: {FAKE_CUDA_FALLBACK}", file=sys.stderr)
    predicted = estimate(spec.model, spec.method, spec.setup, device=device, trust_remote_code=spec.trust_remote_code)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = dry_run(spec.model, spec.method, spec.setup, device=device,
                           trust_remote_code=spec.trust_remote_code).to_dict()
    check = compare_memory(predicted.to_dict(), measured)
    print(predicted.describe())
    for note in predicted.notes:  # e.g. the attention a family without SDPA runs instead
        print(f"note: {note}")
    ranks = (f"rank 0 of {spec.setup.gpus} (fake process group, shard {spec.setup.shard})"
             if spec.setup.gpus > 1 else "one step")
    print(f"{ranks} on fake {device} tensors ({time.perf_counter() - start:.1f} s) beside the estimate:")
    print(comparison_table(predicted.to_dict(), measured))
    print(f"estimate error at the peak: {100 * check.peak_error:+.2f}% of the measured peak")
    if spec.out:
        out = Path(spec.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "summary.json", {"status": "dry-run", "model": spec.model, "method": spec.method.method,
                                          "device": device, "gpus": spec.setup.gpus, "shard": spec.setup.shard, "predicted": predicted.to_dict(), "measured": measured,
                                          "load_peak_bytes": measured.get("load_peak_bytes"),
                                          "comparison": check.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
