"""Dry runs of llama-7b with the five methods: wall time, measured peak vs the estimate, breakdowns.

Each method runs one warm-up and one measured step of the real code on fake tensors
(lowrank/dryrun.py) — bf16, batch 1 × 256 tokens, the GaLore paper's 7B setting for GaLore
(rank 1024, 8-bit Adam, layer-wise) and Q-GaLore (rank 1024), LoRA/QLoRA at rank 64 on every
linear layer — and is compared with `estimate` for the same device.

    python bench/dryrun_7b.py                  # about a minute on one CPU core
    python bench/dryrun_7b.py --model llama2-70b --device cuda
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.constants import CATEGORIES
from estimator.estimate import estimate
from lowrank.device import FAKE_CUDA_FALLBACK, resolve_device
from lowrank.dryrun import dry_run

METHODS = {  # name: (label, method) — also the 7B rows of bench/estimator_accuracy.py
    "full": ("full AdamW", FullConfig()),
    "lora": ("LoRA r64", LoRAConfig(rank=64, targets="all-linear")),
    "qlora": ("QLoRA r64", QLoRAConfig(rank=64, targets="all-linear")),
    "galore": ("GaLore r1024 8-bit layer-wise", GaLoreConfig(rank=1024, optimizer="adamw8bit", layerwise=True)),
    "qgalore": ("Q-GaLore r1024", QGaLoreConfig(rank=1024)),
}
GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-7b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    args = parser.parse_args()
    setup = TrainSetup(batch_size=1, seq_len=256, dtype="bf16")
    device = resolve_device(args.device, fake=True).type
    if device != args.device:
        print(f"note: {FAKE_CUDA_FALLBACK}")
    print(f"{args.model} · bf16 · batch 1 × 256 · fake device {device}\n")
    head = f"{'method':<8} {'time':>7} {'measured':>10} {'estimate':>10} {'error':>7} {'phase (meas/est)':>20}"
    print(head + "".join(f" {c:>11}" for c in CATEGORIES) + f" {'max RSS':>9}")
    rows = []
    for name in args.methods.split(","):
        _, method = METHODS[name]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            measured = dry_run(args.model, method, setup, device=device)
        seconds = time.perf_counter() - start
        est = estimate(args.model, method, setup, device=device)
        error = est.peak_bytes / measured.peak_bytes - 1
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        phases = f"{measured.phase}/{est.phase}"
        print(f"{name:<8} {seconds:>6.1f}s {measured.peak_bytes / GiB:>6.2f} GiB {est.peak_bytes / GiB:>6.2f} GiB "
              f"{100 * error:>+6.2f}% {phases:>20}"
              + "".join(f" {measured.breakdown[c] / GiB:>7.3f} GiB" for c in CATEGORIES) + f" {rss:>5.2f} GiB",
              flush=True)
        rows.append((name, est))
    print("\nestimated breakdowns (GiB)")
    for name, est in rows:
        print(f"{name:<8}" + "".join(f" {c} {est.breakdown[c] / GiB:.3f}" for c in CATEGORIES))


if __name__ == "__main__":
    main()
