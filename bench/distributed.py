"""Two ranks (torchrun, Gloo on this CPU) against one process, for every strategy a method can use.

Each row trains the same global batch for a few steps: one process with batch 2b, or two ranks
with b each (`torchrun --nproc-per-node 2 -m lowrank.train ... --shard S`). It prints tokens/s,
the measured peak of each rank beside the estimator's per-GPU prediction, and the per-rank
memory as a fraction of one process's, measured beside predicted. Prints a markdown table.

    python bench/distributed.py                          # tiny-llama-20m, full and LoRA (~3 minutes)
    python bench/distributed.py --model llama-60m --methods full,lora,galore --steps 6

Target: every rank's measured peak within 3% of the prediction.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from estimator.config import SHARD_STRATEGIES, method_config
from estimator.distributed import refusal

MiB = 2**20
TARGET = 0.03
RANK_OPTIONS = {"lora": ["--rank", "16"], "qlora": ["--rank", "16"], "galore": ["--rank", "64"],
                "qgalore": ["--rank", "64"]}


def run(out: Path, args: list[str], ranks: int) -> dict:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    done = subprocess.run([*head, "-m", "lowrank.train", *args, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} on {ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama-20m")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--batch-per-rank", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    common = ["--model", args.model, "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--eval-every", "0",
              "--dtype", "fp32"]
    b = args.batch_per_rank
    print(f"{args.model}, global batch {2 * b} × {args.seq_len} tokens, fp32, {args.steps} steps, Gloo on CPU\n")
    print("| method | shard | tokens/s (1 process → 2 ranks) | predicted per rank | measured rank 0 / rank 1 "
          "| error | per-rank ÷ one process: measured (predicted) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            method = ["--method", name, *RANK_OPTIONS.get(name, [])]
            one = run(Path(tmp) / f"{name}-one", [*common, *method, "--batch-size", str(2 * b)], 1)
            for shard in SHARD_STRATEGIES:
                if refusal(method_config(name), shard):
                    print(f"| {name} | {shard} | refused | | | | |")
                    continue
                two = run(Path(tmp) / f"{name}-{shard}", [*common, *method, "--batch-size", str(2 * b),
                                                          "--shard", shard], 2)
                predicted = two["predicted"]["peak_bytes"]
                ranks = [r["peak_bytes"] for r in two["measured_ranks"]]
                error = max(abs(p / predicted - 1) for p in ranks)
                worst = max(worst, error)
                ratio = max(ranks) / one["measured"]["peak_bytes"]
                ratio_predicted = predicted / one["predicted"]["peak_bytes"]
                print(f"| {name} | {shard} | {one['final']['tokens_per_s']:,.0f} → {two['final']['tokens_per_s']:,.0f} "
                      f"| {predicted / MiB:.2f} MiB | {' / '.join(f'{p / MiB:.2f}' for p in ranks)} MiB "
                      f"| {100 * error:.2f}% | {ratio:.3f} ({ratio_predicted:.3f}) |", flush=True)
    print(f"\nlargest error {100 * worst:.2f}% (target: within {100 * TARGET:.0f}%)"
          f" — {'met' if worst <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
