"""Every benchmark of the methods, as tables: run this one script.

    python bench/methods.py            # ~15 minutes on two cores (exact SVDs of 4096-wide matrices)
    python bench/methods.py --quick    # ~2 minutes, smaller shapes and models

1. GaLore subspace refresh: ours (randomized SVD) vs ours (exact) vs galore-torch, and the final
   loss of randomized vs exact after the same steps (bench/galore_bench.py).
2. GaLore step time relative to torch AdamW, amortized over the refresh gap (bench/galore_bench.py).
3. GaLore optimizer-state bytes, ours vs galore-torch (bench/galore_bench.py).
4. LoRA step time and peak memory, ours vs peft (bench/lora_vs_peft.py).
5. Q-GaLore projection bytes: INT4 packed two per byte vs one code per byte (this file).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> None:
    """Run a benchmark script as it is meant to be run, its tables going straight to stdout."""
    print(f"\n$ python bench/{script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def projection_bytes_table() -> None:
    """Q-GaLore keeps each projection matrix in INT4; packed two codes per byte, with an fp16
    scale and offset per group of 256, it takes ≤ 0.55× the bytes of a one-code-per-byte store."""
    import torch

    from lowrank.quant import QuantizedMatrix, num_groups

    print("\n### Q-GaLore projection storage (bytes)\n")
    print("| projection (rank × dim) | bf16 | INT4 one code per byte | INT4 packed (ours) | packed / unpacked |")
    print("| --- | --- | --- | --- | --- |")
    for rank, dim in [(128, 512), (256, 1024), (512, 2048), (1024, 4096), (1024, 11008)]:
        matrix = QuantizedMatrix.from_float(torch.randn(dim, rank), bits=4, group_size=256)
        constants = num_groups(rank * dim, 256) * 4
        unpacked = rank * dim + constants
        print(f"| {rank} × {dim} | {2 * rank * dim:,} | {unpacked:,} | {matrix.nbytes:,} | "
              f"{matrix.nbytes / unpacked:.3f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    run("galore_bench.py", *quick)
    run("lora_vs_peft.py", "--threads", "1", "--cpu-time", *quick)
    projection_bytes_table()


if __name__ == "__main__":
    main()
