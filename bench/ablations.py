"""Ablations worth a plot: GaLore's rank and refresh gap, randomized vs exact SVD, and Q-GaLore's
adaptive gap vs a fixed one — loss, memory and the number of SVDs.

    python bench/ablations.py            # ~30 minutes on two cores; tables + assets/ablation_*.png
    python bench/ablations.py --part rank  # one table: rank, gap, svd or reference
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

from estimator.config import GaLoreConfig, QGaLoreConfig, TrainSetup
from estimator.estimate import estimate
from estimator.spec import load_config
from lowrank.data import load_data
from lowrank.methods import Prepared
from lowrank.recipe import RunSpec, evaluate, run_steps, session_for_model

from reproduce import ROOT, MiB, new_model, run

HERE = Path(__file__).resolve().parent

GiB = 2**30


def train_one(args, name: str, method, lr: float):
    setup = TrainSetup(batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32")
    data = load_data(None, None, load_config(args.model).vocab_size, setup.seq_len, setup.batch_size, args.seed,
                     ROOT / "runs" / ".cache")
    return run(name, new_model(args.model, args.seed), method, setup, data, args.steps, lr, args.eval_batches)


def rank_sweep(args) -> list[str]:
    """Each rank at each learning rate of args.rank_lrs: the update's norm grows with the rank
    (Adam's normalized step in r directions, projected back), so one fixed lr favours low ranks."""
    lr_cols = " | ".join(f"eval loss, lr {lr:g}" for lr in args.rank_lrs)
    rows = ["### GaLore rank", "", f"| rank | {lr_cols} | measured peak (MiB) | optimizer state, 7B (GiB, predicted) "
            "| 7B peak (GiB, predicted) |", "| --- | " + "--- | " * len(args.rank_lrs) + "--- | --- | --- |"]
    points = []
    for rank in args.ranks:
        method = GaLoreConfig(rank=rank, update_proj_gap=args.gap, scale=0.25)
        results = [train_one(args, f"rank {rank}, lr {lr:g}", method, lr) for lr in args.rank_lrs]
        best = min(r.eval_loss for r in results)
        seven_b = GaLoreConfig(rank=rank * 16, update_proj_gap=args.gap, scale=0.25)  # same share of the width
        est = estimate("llama-7b", seven_b, TrainSetup(batch_size=1, seq_len=256))
        losses = " | ".join(f"**{r.eval_loss:.3f}**" if r.eval_loss == best else f"{r.eval_loss:.3f}" for r in results)
        rows.append(f"| {rank} (7B: {rank * 16}) | {losses} | {results[0].peak_bytes / MiB:.1f} | "
                    f"{est.breakdown['optimizer'] / GiB:.2f} | {est.peak_bytes / GiB:.2f} |")
        points.append((rank, best, results[0].peak_bytes / MiB))
    plot_xy(points, "GaLore rank (eval loss: the better learning rate)", HERE.parent / "assets" / "ablation_rank.png")
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


def against_reference(args) -> list[str]:
    """Is the rank curve GaLore's or ours? The same runs with galore-torch's GaLoreAdamW, both with a
    constant lr and no clipping (galore-torch has neither schedule nor per-layer clipping)."""
    from galore_bench import reference_galore

    rows = ["### The rank curve with galore-torch", "", "| rank | ours | galore-torch | difference |",
            "| --- | --- | --- | --- |"]
    setup = TrainSetup(batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32")
    for rank in args.reference_ranks:
        losses = {}
        for label in ("ours", "galore-torch"):
            data = load_data(None, None, load_config(args.model).vocab_size, args.seq_len, args.batch_size, args.seed,
                             ROOT / "runs" / ".cache")
            cfg = GaLoreConfig(rank=rank, update_proj_gap=args.gap, scale=0.25)
            spec = RunSpec(label, cfg, setup, steps=args.steps, lr=args.lr, warmup=0, min_lr_ratio=1.0, grad_clip=None,
                           eval_batches=args.eval_batches)  # a constant lr, no clipping: what galore-torch does
            session = session_for_model(spec, new_model(args.model, args.seed), data)
            if label == "galore-torch":
                model = session.prepared.model
                session.prepared = Prepared(model, reference_galore(model, cfg, args.lr), cfg)
            list(run_steps(session))
            losses[label] = evaluate(session)
            print(f"  rank {rank}, {label:<14} eval loss {losses[label]:.3f}", file=sys.stderr, flush=True)
        rows.append(f"| {rank} | {losses['ours']:.3f} | {losses['galore-torch']:.3f} | "
                    f"{100 * (losses['ours'] / losses['galore-torch'] - 1):+.2f}% |")
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
    parser.add_argument("--rank-lrs", default="3e-3,1e-2", help="learning rates every rank is trained at")
    parser.add_argument("--part", choices=("all", "rank", "gap", "svd", "reference"), default="all")
    args = parser.parse_args()
    args.rank_lrs = [float(x) for x in args.rank_lrs.split(",")]
    args.ranks, args.gaps = [8, 16, 32, 64, 128], [10, 50, 200, 1000]  # 128: the K/V width of tiny-llama-5m
    args.reference_ranks = [16, 64]
    if args.quick:
        args.steps, args.eval_batches, args.ranks, args.gaps = 8, 2, [16, 64], [2, 8]
        args.reference_ranks = [16]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    sections = {"rank": rank_sweep, "gap": gap_sweep, "svd": svd_and_adaptive, "reference": against_reference}
    for part, section in sections.items():
        if args.part not in ("all", part):
            continue
        print("\n".join(section(args)) + "\n", flush=True)


if __name__ == "__main__":
    main()
