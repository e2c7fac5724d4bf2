"""Per-GPU memory of data-parallel training: the estimate beside rank 0's dry run.

For every method × strategy that can train (the others are listed as refused, with why), the
estimator's per-GPU peak (`--gpus N --shard S`) beside the peak of rank 0's real step on fake
tensors with torch's fake process group — DDP's buckets, ZeRO-1's partition, FSDP2's sharded
parameters, gathers and reduce-scatters as the engines allocate them. Prints a markdown table.

    python bench/distributed_accuracy.py                    # 7B and 70B on 8 GPUs (~20 minutes here)
    python bench/distributed_accuracy.py --quick            # 7B only
    python bench/distributed_accuracy.py --models llama3.1-405b --gpus 64 --shard full
    python bench/distributed_accuracy.py --cpu-offload      # FSDP2 with CPUOffloadPolicy: GPU and host apart

Target: every peak within 5%.
"""

from __future__ import annotations

import argparse
import time
import warnings

from estimator.config import (
    SHARD_STRATEGIES,
    FullConfig,
    GaLoreConfig,
    LoRAConfig,
    QGaLoreConfig,
    QLoRAConfig,
    TrainSetup,
)
from estimator.distributed import refusal
from estimator.estimate import estimate
from lowrank.dryrun import dry_run
from lowrank.report import compare_memory

GiB = 2**30
METHODS = [
    ("full AdamW", FullConfig()),
    ("LoRA r64", LoRAConfig(rank=64)),
    ("QLoRA r64", QLoRAConfig(rank=64)),
    ("GaLore r1024 8-bit layer-wise", GaLoreConfig(rank=1024, optimizer="adamw8bit", layerwise=True)),
    ("Q-GaLore r1024", QGaLoreConfig(rank=1024)),
]
TARGET = 0.05


def row(model: str, name: str, method, setup: TrainSetup) -> dict:
    why = refusal(method, setup.shard)
    if why:
        return {"model": model, "method": name, "shard": setup.shard, "refused": why}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = dry_run(model, method, setup, device="cpu").to_dict()
    seconds = time.perf_counter() - start
    predicted = estimate(model, method, setup, device="cpu").to_dict()
    check = compare_memory(predicted, measured)
    return {"model": model, "method": name, "shard": setup.shard, "predicted": predicted["peak_bytes"],
            "measured": measured["peak_bytes"], "phase": measured["phase"], "error": check.peak_error,
            "seconds": seconds, "host": (predicted["host"]["peak_bytes"], measured["host"]["peak_bytes"],
                                         check.host_error) if setup.cpu_offload else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="llama-7b only")
    parser.add_argument("--models", default="llama-7b,llama2-70b", help="comma-separated presets")
    parser.add_argument("--gpus", type=int, default=8, help="ranks (rank 0 is run)")
    parser.add_argument("--shard", default=",".join(SHARD_STRATEGIES), help="comma-separated strategies")
    parser.add_argument("--batch-per-gpu", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="FSDP2's CPUOffloadPolicy (gradients and full only): the GPU's peak and the host's memory")
    args = parser.parse_args()
    models = ["llama-7b"] if args.quick else args.models.split(",")
    strategies = args.shard.split(",")
    if args.cpu_offload:
        strategies = [s for s in strategies if s in ("gradients", "full")]
    print(f"{args.gpus} GPUs, batch {args.batch_per_gpu} per GPU × {args.seq_len} tokens, bf16"
          f"{', checkpointing' if args.grad_checkpointing else ''}{', CPU offload' if args.cpu_offload else ''}; "
          "peak of rank 0 (GiB)\n")
    host_head = " host predicted | host dry run | host error |" if args.cpu_offload else ""
    print(f"| model | method | shard | predicted | dry run (phase) | error |{host_head} dry run s |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * (3 if args.cpu_offload else 0) + "---:|")
    worst = 0.0
    for model in models:
        for shard in strategies:
            for name, method in METHODS:
                setup = TrainSetup(batch_size=args.batch_per_gpu * args.gpus, seq_len=args.seq_len, gpus=args.gpus,
                                   shard=shard, grad_checkpointing=args.grad_checkpointing,
                                   cpu_offload=args.cpu_offload)
                r = row(model, name, method, setup)
                if "refused" in r:
                    print(f"| {model} | {name} | {shard} | refused | — | — |{' — | — | — |' if host_head else ''} — |")
                    continue
                worst = max(worst, abs(r["error"]), abs(r["host"][2]) if r["host"] else 0.0)
                host = (f" {r['host'][0] / GiB:.2f} | {r['host'][1] / GiB:.2f} | {100 * r['host'][2]:+.2f}% |"
                        if r["host"] else "")
                print(f"| {model} | {name} | {shard} | {r['predicted'] / GiB:.2f} | {r['measured'] / GiB:.2f} "
                      f"({r['phase']}) | {100 * r['error']:+.2f}% |{host} {r['seconds']:.0f} |", flush=True)
    print(f"\nlargest error {100 * worst:.2f}% (target: within {100 * TARGET:.0f}%)"
          f" — {'met' if worst <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
