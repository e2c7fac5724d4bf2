"""A 7B of every method trained for real on one large GPU: the load's and the steps' allocated and
reserved peaks beside the estimate, as a markdown table (bench/gpu_check.sh runs it).

    python bench/gpu_7b.py                              # llama-7b (random weights), CUDA, ~4 minutes on an H200
    python bench/gpu_7b.py --device cpu --quick         # the same logic on tiny-llama-5m, on the CPU (~1 minute)
    python bench/gpu_7b.py --methods qlora,qlora-peft --shapes 1x512 --out results.json

Each method runs in a process of its own, so the allocator's peak since the process started is its
load: the trainer's own path (lowrank.recipe.start_session: build at random in fp32, cast to bf16
on the host, move, apply the method — QLoRA quantizes its linears one at a time onto the GPU),
measured as a run measures it (`load_peak_bytes`). Then `--steps` steps at each shape (batch ×
sequence) on the same prepared model (its data rebuilt for the shape), each step's allocated peak
from the allocator (reset per step), the reserved peak beside it; the second step of each shape
is measured by category. Nothing is saved (no checkpoint, no final model: a 7B folder is 13 GB).

Methods: full (8-bit AdamW: what fits one GPU with room to spare), LoRA r64, QLoRA r64 (ours and
the peft recipe), GaLore r1024 8-bit layer-wise, Q-GaLore r1024; all-linear targets, bf16.
Columns: load / step peaks measured (allocated, reserved) and estimated, errors of the allocated
peaks, and what the estimator says a GPU needs (the larger peak plus the overhead) beside the
largest reserved peak measured. `--budget` seconds bound the whole script: methods that would
start after it are listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = {  # name: (label, method name, options)
    "qlora": ("QLoRA r64", "qlora", {"rank": 64}),
    "qlora-peft": ("QLoRA r64, peft recipe", "qlora", {"rank": 64, "recipe": "peft"}),
    "lora": ("LoRA r64", "lora", {"rank": 64}),
    "galore": ("GaLore r1024 8-bit layer-wise", "galore", {"rank": 1024, "optimizer": "adamw8bit", "layerwise": True}),
    "qgalore": ("Q-GaLore r1024", "qgalore", {"rank": 1024}),
    "full": ("full 8-bit AdamW", "full", {"optimizer": "adamw8bit"}),
}
QUICK_OPTIONS = {"rank": 8}  # --quick: ranks a tiny model has room for
GiB = 2**30


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, seq = text.lower().partition("x")
    return int(batch), int(seq)


# ------------------------------------------------------------------------------------ one method (child)
def run_one(name: str, model: str, shapes: list[tuple[int, int]], steps: int, device_name: str, quick: bool,
            work: Path) -> dict:
    """Load `model` for method `name` once, then `steps` steps at each shape: the row data."""
    import torch

    from estimator.config import TrainSetup, method_config
    from estimator.spec import load_spec
    from lowrank.recipe import RunSpec, start_session

    label, method_name, options = METHODS[name]
    if quick:
        options = {**options, **{k: v for k, v in QUICK_OPTIONS.items() if k in options}}
        label = label.replace("r1024", "r8").replace("r64", "r8")
    method = method_config(method_name, **options)
    first = TrainSetup(batch_size=shapes[0][0], seq_len=shapes[0][1], dtype="bf16")
    spec = RunSpec(model, method, first, out=str(work / name), steps=steps * len(shapes), eval_every=0,
                   checkpoint_minutes=0, device=device_name, measure_step=2)
    cuda = device_name.startswith("cuda")
    begin = time.perf_counter()
    session = start_session(spec)  # predicts, loads the data, builds, casts, moves, prepares: the load
    row = {"method": name, "label": label, "model": model, "device": str(session.device),
           "load_seconds": time.perf_counter() - begin, "load_allocated": session.load_peak_bytes,
           "load_reserved": torch.cuda.max_memory_reserved(session.device) if cuda else None,
           "load_predicted": session.predicted.load_bytes, "load_moment": session.predicted.load_moment,
           "shapes": []}
    model_spec = load_spec(model)
    for b, s in shapes:
        try:
            row["shapes"].append(run_shape(session, model_spec, method, b, s, shapes[0], steps, device_name, work))
        except Exception as err:  # out of memory at this shape: the next one may still fit
            row["shapes"].append({"shape": f"{b}x{s}", "error": f"{type(err).__name__}: {err}"[:200]})
            if cuda:
                torch.cuda.empty_cache()
    return row


def run_shape(session, model_spec, method, b: int, s: int, first: tuple[int, int], steps: int, device_name: str,
              work: Path) -> dict:
    """`steps` steps of batch `b` × `s` tokens on the session's prepared model."""
    import torch

    from estimator.config import TrainSetup
    from estimator.estimate import estimate_spec
    from lowrank.data import load_data
    from lowrank.recipe import RunSpec, Session, run_step

    cuda = device_name.startswith("cuda")
    setup = TrainSetup(batch_size=b, seq_len=s, dtype="bf16")
    if (b, s) != first:  # the same prepared model, data cut for this shape
        data = load_data(None, None, model_spec.vocab_size, s, b, 0, work / ".cache",
                         max_position=model_spec.max_position)
        spec = RunSpec(session.spec.model, method, setup, out=session.spec.out, steps=steps, eval_every=0,
                       checkpoint_minutes=0, device=device_name)
        session = Session(spec, setup, session.device, data, session.prepared,
                          estimate_spec(model_spec, method, setup, device=session.device.type),
                          model_spec.params_total, False, None, session.load_peak_bytes)
    predicted = session.predicted
    allocated, reserved, seconds, measured = [], [], [], None
    for step in range(steps):
        start = time.perf_counter()
        result = run_step(session, step, measure=step == 1)
        seconds.append(time.perf_counter() - start)
        allocated.append(result.memory_peak_bytes)
        if cuda:
            reserved.append(torch.cuda.max_memory_reserved(session.device))
        measured = result.measured or measured
    steady = allocated[1:] or allocated  # the first step creates the optimizer states
    return {"shape": f"{b}x{s}", "step_allocated": max(steady), "step_allocated_first": allocated[0],
            "step_reserved": max(reserved) if reserved else None, "step_predicted": predicted.peak_bytes,
            "needs_predicted": predicted.total_bytes, "moment": predicted.moment,
            "measured_phase": (measured or {}).get("phase"), "step_seconds": seconds,
            "breakdown": (measured or {}).get("breakdown")}


def child(args: argparse.Namespace) -> int:
    import warnings

    warnings.simplefilter("ignore")
    try:
        row = run_one(args.one, args.model, [parse_shape(s) for s in args.shapes.split(",")], args.steps,
                      args.device, args.quick, Path(args.work))
    except Exception as err:  # out of memory included: the row says so
        row = {"method": args.one, "label": METHODS[args.one][0], "error": f"{type(err).__name__}: {err}"[:300]}
    print("ROW " + json.dumps(row), flush=True)
    return 0


# ------------------------------------------------------------------------------------ the table (parent)
def gib(n) -> str:
    return "—" if n is None else f"{n / GiB:,.2f}" if n >= GiB else f"{n / 2**20:,.1f} Mi"


def err(predicted, measured) -> str:
    return "—" if not measured or predicted is None else f"{100 * (predicted - measured) / measured:+.1f}%"


def table(rows: list[dict], model: str, device: str) -> str:
    lines = [f"{model} · bf16 · {device} · GiB (Mi: MiB) · alloc = torch.cuda.max_memory_allocated, reserved = "
             "max_memory_reserved (CPU: live tensors, nothing reserved) · needs est = the estimate's larger peak + "
             "overhead\n",
             "| method | shape | load alloc | load reserved | load est | load err | step alloc | step reserved | "
             "step est | step err | needs est | largest reserved | load s | step s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['label']} | — | {row.get('error') or row['skipped']} |" + " |" * 11)
            continue
        for i, shape in enumerate(row["shapes"]):
            first = i == 0
            cells = [row["label"] if first else "", shape["shape"]]
            cells += [gib(row["load_allocated"]), gib(row["load_reserved"]), gib(row["load_predicted"]),
                      err(row["load_predicted"], row["load_allocated"])] if first else [""] * 4
            if "error" in shape:
                cells += [shape["error"]] + [""] * 5
            else:
                largest = max(filter(None, [row["load_reserved"], shape["step_reserved"]]), default=None)
                steps = shape["step_seconds"]
                cells += [gib(shape["step_allocated"]), gib(shape["step_reserved"]), gib(shape["step_predicted"]),
                          err(shape["step_predicted"], shape["step_allocated"]), gib(shape["needs_predicted"]),
                          gib(largest)]
            cells += [f"{row['load_seconds']:.0f}" if first else "",
                      f"{sum(steps) / len(steps):.2f}" if "error" not in shape else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default llama-7b (tiny-llama-5m with --quick)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny-llama-5m at 1x64 and 2x128: the logic, fast")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--shapes", default=None, help="batch x sequence, comma-separated (default 1x512,4x1024)")
    parser.add_argument("--steps", type=int, default=3, help="steps at each shape")
    parser.add_argument("--budget", type=float, default=330, help="seconds for the whole script")
    parser.add_argument("--timeout", type=float, default=240, help="seconds for one method")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--one", choices=tuple(METHODS), help=argparse.SUPPRESS)  # a child: one method
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny-llama-5m" if args.quick else "llama-7b")
    args.shapes = args.shapes or ("1x64,2x128" if args.quick else "1x512,4x1024")
    if args.one:
        return child(args)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; pick from {', '.join(METHODS)}")
    rows, deadline = [], time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu-7b-") as work:
        for name in names:
            left = deadline - time.monotonic()
            if left < 20:
                rows.append({"method": name, "label": METHODS[name][0], "skipped": "skipped: out of --budget"})
                continue
            command = [sys.executable, __file__, "--one", name, "--work", work, "--model", args.model,
                       "--device", args.device, "--shapes", args.shapes, "--steps", str(args.steps),
                       *(["--quick"] if args.quick else [])]
            begin = time.monotonic()
            try:
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                      timeout=min(args.timeout, left), env={**os.environ, "PYTHONPATH": str(REPO)})
                found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
                row = json.loads(found[-1]) if found else {
                    "method": name, "label": METHODS[name][0],
                    "error": f"exit {done.returncode}: " + " ".join((done.stderr or "").strip().splitlines()[-1:])[:200]}
            except subprocess.TimeoutExpired:
                row = {"method": name, "label": METHODS[name][0], "error": f"over {min(args.timeout, left):.0f} s"}
            row["seconds"] = time.monotonic() - begin
            rows.append(row)
            print(f"{name}: {row.get('error') or 'done'} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(table(rows, args.model, args.device))
    if args.out:
        with contextlib.suppress(OSError):
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
