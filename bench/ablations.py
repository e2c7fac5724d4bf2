"""Ablations worth a plot: GaLore's rank and refresh gap, randomized vs exact SVD, and Q-GaLore's
adaptive gap vs a fixed one — loss, memory and the number of SVDs.

    python bench/ablations.py            # ~25 minutes on two cores; tables + assets/ablation_*.png
    python bench/ablations.py --quick    # a smoke test

Memory is both predicted (the estimator, for a 7B at batch 1 × 256: where rank matters) and
measured (the small model trained here).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from reproduce import ROOT, MiB, new_model, run  # noqa: E402

from estimator.config import GaLoreConfig, QGaLoreConfig, TrainSetup  # noqa: E402
from estimator.estimate import estimate  # noqa: E402
from estimator.spec import load_config  # noqa: E402
from lowrank.data import load_data  # noqa: E402

GiB = 2**30


def train_one(args, name: str, method, lr: float):
    setup = TrainSetup(batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32")
    data = load_data(None, None, load_config(args.model).vocab_size, setup.seq_len, setup.batch_size, args.seed,
                     ROOT / "runs" / ".cache")
    return run(name, new_model(args.model, args.seed), method, setup, data, args.steps, lr, args.eval_batches)


def rank_sweep(args) -> list[str]:
    rows = ["### GaLore rank", "", "| rank | eval loss | measured peak (MiB) | optimizer state, 7B (GiB, predicted) "
            "| 7B peak (GiB, predicted) |", "| --- | --- | --- | --- | --- |"]
    points = []
    for rank in args.ranks:
        method = GaLoreConfig(rank=rank, update_proj_gap=args.gap, scale=0.25)
        result = train_one(args, f"rank {rank}", method, args.lr)
        seven_b = GaLoreConfig(rank=rank * 16, update_proj_gap=args.gap, scale=0.25)  # same share of the width
        est = estimate("llama-7b", seven_b, TrainSetup(batch_size=1, seq_len=256))
        rows.append(f"| {rank} (7B: {rank * 16}) | {result.eval_loss:.3f} | {result.peak_bytes / MiB:.1f} | "
                    f"{est.breakdown['optimizer'] / GiB:.2f} | {est.peak_bytes / GiB:.2f} |")
        points.append((rank, result.eval_loss, result.peak_bytes / MiB))
    plot_xy(points, "GaLore rank", HERE.parent / "assets" / "ablation_rank.png")
    return rows


def gap_sweep(args) -> list[str]:
    rows = ["### GaLore update_proj_gap", "", "| gap | eval loss | SVDs (all layers) | time (s) |", "| --- | --- | --- | --- |"]
    points = []
    for gap in args.gaps:
        result = train_one(args, f"gap {gap}", GaLoreConfig(rank=args.rank, update_proj_gap=gap, scale=0.25), args.lr)
        rows.append(f"| {gap} | {result.eval_loss:.3f} | {result.svd_count} | {result.seconds:.0f} |")
        points.append((gap, result.eval_loss, result.svd_count))
    plot_xy(points, "update_proj_gap", HERE.parent / "assets" / "ablation_gap.png", right="SVDs")
    return rows


def svd_and_adaptive(args) -> list[str]:
    rows = ["### Randomized vs exact SVD; Q-GaLore adaptive vs fixed gap", "",
            "| run | eval loss | SVDs (all layers) | time (s) |", "| --- | --- | --- | --- |"]
    runs = [("GaLore, randomized SVD", GaLoreConfig(rank=args.rank, update_proj_gap=args.gap, scale=0.25)),
            ("GaLore, exact SVD", GaLoreConfig(rank=args.rank, update_proj_gap=args.gap, scale=0.25, svd="exact")),
            ("Q-GaLore, adaptive gap", QGaLoreConfig(rank=args.rank, update_proj_gap=args.gap // 2, scale=0.25)),
            ("Q-GaLore, fixed gap", QGaLoreConfig(rank=args.rank, update_proj_gap=args.gap // 2, scale=0.25,
                                                  adaptive=False))]
    for name, method in runs:
        result = train_one(args, name, method, args.lr)
        rows.append(f"| {name} | {result.eval_loss:.3f} | {result.svd_count} | {result.seconds:.0f} |")
    return rows


def plot_xy(points, xlabel: str, path: Path, right: str = "measured peak (MiB)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, losses, other = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(xs, losses, "o-", color="tab:blue")
    ax.set(xscale="log", xlabel=xlabel, ylabel="eval loss")
    twin = ax.twinx()
    twin.plot(xs, other, "s--", color="tab:orange")
    twin.set_ylabel(right, color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="tiny-llama-5m")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.ranks, args.gaps = [8, 16, 32, 64, 128], [10, 50, 200, 1000]  # 128: the K/V width of tiny-llama-5m
    if args.quick:
        args.steps, args.eval_batches, args.ranks, args.gaps = 8, 2, [16, 64], [2, 8]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    for section in (rank_sweep, gap_sweep, svd_and_adaptive):
        print("\n".join(section(args)) + "\n", flush=True)


if __name__ == "__main__":
    main()
