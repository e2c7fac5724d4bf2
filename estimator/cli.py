"""`python -m estimator MODEL --method METHOD [options] [--json] [--fit-table] [--max-batch-size GPU]`.

Prints a readable breakdown by default, the estimate's JSON object with --json
(`Estimate.to_dict`: model, method, params, peak_bytes, phase, moment, breakdown, overhead_bytes,
moments, activation_terms, options, notes, load; with --cpu-offload, host: the host memory of
each GPU's process, apart from the GPU's peak). A GPU must hold the larger of the step's peak
and the load's (building and preparing the model, estimator/load.py), plus the overhead. Bad
input exits with status 2 and one line naming the value and the fix.
"""

from __future__ import annotations

import json

from .arguments import OneLineParser, add_training_arguments, configs_from_args
from .config import check_json_numbers
from .constants import CATEGORIES
from .estimate import Estimate, GiB, estimate_spec
from .gpus import find_gpu, fit_table, gpus_needed, max_batch_size, max_seq_len, per_gpu_bytes
from .options import as_flags
from .spec import load_spec, preset_names


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="python -m estimator",
        description="Predict the memory of one training step: peak, phase and breakdown by category.",
    )
    parser.add_argument("model", nargs="?", help="preset name, config.json path, model folder, or hub id")
    add_training_arguments(parser)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the step runs (cuda adds the context and allocator overhead)")
    parser.add_argument("--fit-table", action="store_true",
                        help="add the table of GPUs: fits at --gpus, and how many each one needs")
    parser.add_argument("--max-batch-size", metavar="GPU", help="largest batch size and sequence length on GPU")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own config code")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def render(est: Estimate) -> str:
    lines = [est.describe()]
    p = est.params_total
    t = est.params_trainable
    trainable = f"{t / 1e9:.3f} B" if t >= 1e9 else f"{t / 1e6:,.2f} M"
    active = f"{est.params_active / 1e9:.3f} B active per token, " if est.params_active is not None else ""
    lines.append(f"parameters: {p / 1e9:.3f} B total, {active}{trainable} trainable ({100 * t / p:.2f}%)")
    lines.append(f"peak allocated: {gib(est.peak_bytes)} in {est.moment}")
    width = max(est.breakdown.values()) or 1
    for cat in CATEGORIES:
        value = est.breakdown[cat]
        bar = "█" * round(24 * value / width)
        lines.append(f"  {cat:<12} {gib(value):>14}  {100 * value / max(est.peak_bytes, 1):5.1f}%  {bar}")
    larger = " (the larger: what a GPU must hold)" if est.load_bytes > est.peak_bytes else ""
    lines.append(f"load (build, cast, move, prepare): {gib(est.load_bytes)} at {est.load_moment}{larger}")
    if est.host_bytes is not None:
        parts = ", ".join(f"{cat} {gib(value)}" for cat, value in est.host_breakdown.items() if value)
        lines.append(f"host memory (CPU offload, outside the GPU's peak): {gib(est.host_bytes)} per GPU, in its "
                     f"process ({parts})")
    if est.overhead_bytes:
        lines.append(f"overhead (CUDA context, allocator slack): {gib(est.overhead_bytes)} → "
                     f"needs {gib(est.total_bytes)} on a GPU")
    if est.distributed_terms:
        lines.append(f"per GPU, shard {est.options['shard']} over {est.options['gpus']} GPUs:")
        lines += [f"  {name:<52} {gib(value):>12}" for name, value in est.distributed_terms.items()]
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def render_gpus(rows: list[dict], shard: str | None = None) -> str:
    needs = f"  needs (shard {shard})" if shard else ""
    out = [f"{'GPU':<18} {'memory':>10} {'fits':>5} {'headroom':>11}{needs}"]
    for r in rows:
        line = (f"{r['gpu']:<18} {r['memory_gib']:>6.1f} GiB {'yes' if r['fits'] else 'no':>5} "
                f"{r['headroom_gib']:>7.2f} GiB")
        if shard:
            n = r["gpus_needed"]
            line += f"  {'no count' if n is None else n:>{len(needs) - 2}}"
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model:
        names = ", ".join(preset_names())
        parser.error(f"give a MODEL: a preset ({names}), a config.json path, a model folder or a hub id")
    try:
        method, setup = configs_from_args(args)
        spec = load_spec(args.model, args.trust_remote_code)
        est = estimate_spec(spec, method, setup, device=args.device)
        gpu = find_gpu(args.max_batch_size) if args.max_batch_size else None
        result = est.to_dict()
        check_json_numbers({**result, "total_bytes": est.total_bytes})
    except ValueError as err:
        parser.error(as_flags(str(err), args.method))
    text = [render(est)]
    if args.fit_table:
        rows = fit_table(est)
        sharded = setup.shard != "none"
        if sharded:  # how many of each GPU this step needs at its per-GPU micro-batch
            need = per_gpu_bytes(spec, method, setup)
            for row in rows:
                row["gpus_needed"] = gpus_needed(spec, method, setup, find_gpu(row["gpu"]), need=need)
        result["gpus"] = rows
        fits = [r["gpu"] for r in rows if r["fits"]]
        text.append("\n" + render_gpus(rows, setup.shard if sharded else None))
        per_gpu = f" at {setup.gpus} GPUs (shard {setup.shard})" if setup.gpus > 1 else ""
        text.append(f"fits {len(fits)} of {len(rows)} GPUs{per_gpu}")
        if sharded:
            text.append(f"needs: the fewest of that GPU that fit at batch {setup.per_gpu_batch} per GPU; no count: "
                        "what sharding cannot divide (activations, a block's gathered weights) does not fit")
    elif args.device == "cuda":
        fits = [r["gpu"] for r in fit_table(est) if r["fits"]]
        text.append("fits: " + (", ".join(fits) if fits else "none of the catalog's GPUs"))
    if gpu is not None:
        batch = max_batch_size(spec, method, setup, gpu)
        seq = max_seq_len(spec, method, setup, gpu)
        result["max_batch_size"] = {"gpu": gpu.name, "batch_size": batch, "seq_len": setup.seq_len,
                                    "max_seq_len": seq, "at_batch_size": setup.batch_size}
        b = "does not fit even at batch 1" if batch is None else f"batch size up to {batch}"
        at = f"batch {setup.batch_size}"
        if setup.gpus > 1:
            b += f" per GPU of {setup.gpus} (shard {setup.shard})"
            at = f"batch {setup.per_gpu_batch} per GPU"
        s = "no sequence length fits" if seq is None else f"sequences up to {seq} tokens"
        text.append(f"\n{gpu.name} ({gpu.memory_mib / 1024:.1f} GiB): {b} at {setup.seq_len} tokens; "
                    f"{s} at {at}")
    print(json.dumps(result, indent=1) if args.json else "\n".join(text))
    return 0
