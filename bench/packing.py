"""Sequence packing (`--packed`) against padding: throughput, padding share, memory predicted vs measured.

    python bench/packing.py               # ~2 minutes on two cores: 20 steps per setting
    python bench/packing.py --steps 5     # quicker

tiny-llama-20m (fp32, CPU) trained with full AdamW on the data that ships with the package:
  * code: the stdlib code task (lowrank/data.py `code_task`, prompt/response records): padded rows
    (one record per row, right-padded, attention mask) vs packed rows (records joined, no padding).
  * text: the default corpus (Python's documentation topics): plain blocks (attention crosses
    documents) vs packed rows (attention kept inside each document, position ids restarting).
tokens/s counts the tokens the model reads that are not padding; the padding share is the share of
row positions that are padding; the peak is one steady-state step measured by lowrank's tracker
beside the estimator's prediction for the same setup.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from estimator.config import FullConfig, TrainSetup
from estimator.estimate import estimate
from estimator.spec import load_config
from lowrank.data import code_task, load_data
from lowrank.methods import prepare
from lowrank.step import measure_steady_step, training_step

MODEL = "tiny-llama-20m"
MiB = 2**20


def bench(source: str | None, packed: bool, steps: int, batch: int, seq: int, cache: Path) -> dict:
    config = load_config(MODEL)
    data = load_data(source, None, config.vocab_size, seq, batch, 0, cache, packed=packed)
    padded = data.kind == "jsonl" and not packed
    setup = TrainSetup(batch_size=batch, seq_len=seq, dtype="fp32", padded=padded, packed=packed)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    prepared = prepare(model, FullConfig(), setup, lr=1e-4)
    batches = [next(data.train) for _ in range(steps + 1)]
    training_step(prepared, [batches[0]], setup)  # warm-up: optimizer states
    tokens, start = 0, time.perf_counter()
    for b in batches[1:]:
        training_step(prepared, [b], setup)
        tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    seconds = time.perf_counter() - start
    measured = measure_steady_step(prepared, [batches[1]], setup)
    predicted = estimate(MODEL, FullConfig(), setup, device="cpu")
    rows = data.train.rows
    return {"tokens_per_s": tokens / seconds, "padding": 1 - rows.tokens / rows.input_ids.numel(),
            "rows": len(rows), "predicted": predicted.peak_bytes, "measured": measured.peak_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code.jsonl"
        code.write_text("\n".join(json.dumps(r) for r in code_task()))
        print(f"{MODEL}, fp32 CPU, full AdamW, batch {args.batch_size} × {args.seq_len}, {args.steps} steps\n")
        print("| data | rows | train rows | padding | tokens/s (non-pad) | peak predicted | peak measured | error |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, source, plain in (("code", str(code), "padded"), ("text", None, "blocks")):
            for packed in (False, True):
                r = bench(source, packed, args.steps, args.batch_size, args.seq_len, Path(tmp))
                print(f"| {name} | {'packed' if packed else plain} | {r['rows']:,} | {100 * r['padding']:.1f}% | "
                      f"{r['tokens_per_s']:,.0f} | {r['predicted'] / MiB:,.2f} MiB | {r['measured'] / MiB:,.2f} MiB | "
                      f"{100 * (r['predicted'] / r['measured'] - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
