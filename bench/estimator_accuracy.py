"""Predicted vs measured memory of one steady-state training step, on this machine's CPU.

Every method (with its 8-bit and layer-wise variants) × three model sizes × three batch/sequence
settings: the estimator's peak beside the peak that lowrank.memory.MemoryTracker measures on a
real step (the same code path `python -m lowrank.train` uses). Prints a markdown table.

    python bench/estimator_accuracy.py                 # ~5 minutes on two cores
    python bench/estimator_accuracy.py --quick         # one model, one setting
    python bench/estimator_accuracy.py --dry-run-7b    # and a 7B of every method on fake tensors
    python bench/estimator_accuracy.py --levers        # and the memory levers (after the methods)
    python bench/estimator_accuracy.py --levers-only   # the levers alone (~3 minutes)

The levers (tiny-llama-20m and llama-60m; 4 × 128, and 2 × 512 with checkpointing): the chunked
loss and packed batches under full AdamW, LoRA and QLoRA; LoRA and QLoRA training embed_tokens and
lm_head in full (modules_to_save), and with LoRA on lm_head. Packed rows are built by
lowrank.data.packed_rows, position ids restarting per document, as a `--packed` run gets them.

Targets: the peak within 5%, and every category holding ≥10% of the peak within 5%.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import torch

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate_spec
from estimator.spec import load_config, load_spec
from lowrank.data import packed_rows
from lowrank.methods import prepare
from lowrank.report import compare_memory
from lowrank.step import measure_steady_step

MiB = 2**20
METHODS = [
    ("full AdamW", FullConfig()),
    ("full AdamW8bit", FullConfig(optimizer="adamw8bit")),
    ("LoRA r16", LoRAConfig(rank=16)),
    ("QLoRA r16", QLoRAConfig(rank=16)),
    ("GaLore r64", GaLoreConfig(rank=64)),
    ("GaLore r64 8-bit layer-wise", GaLoreConfig(rank=64, optimizer="adamw8bit", layerwise=True)),
    ("Q-GaLore r64", QGaLoreConfig(rank=64)),
]
MODELS = ["tiny-llama-5m", "tiny-llama-20m", "llama-60m"]
SETUPS = [("4×128", TrainSetup(batch_size=4, seq_len=128)),
          ("2×512 ckpt", TrainSetup(batch_size=2, seq_len=512, grad_checkpointing=True)),
          ("1×64 accum 2", TrainSetup(batch_size=1, seq_len=64, grad_accum=2))]

LEVER_MODELS = ["tiny-llama-20m", "llama-60m"]
LEVER_SETUPS = SETUPS[:2]
# LoRA on every linear and on lm_head (a list: "all-linear,lm_head" would name lm_head alone)
ALL_LINEAR_AND_HEAD = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"
SAVED = "embed_tokens,lm_head"
# (method label, method, the lever's name in the setting column, what it changes in the setup)
LEVERS = [
    *[(label, method, name, change) for name, change in (("chunked loss", dict(loss="chunked")),
                                                         ("packed", dict(packed=True)))
      for label, method in METHODS if label in ("full AdamW", "LoRA r16", "QLoRA r16")],
    (f"LoRA r16 + {SAVED} in full", LoRAConfig(rank=16, modules_to_save=SAVED), "", {}),
    (f"QLoRA r16 + {SAVED} in full", QLoRAConfig(rank=16, modules_to_save=SAVED), "", {}),
    ("LoRA r16 all-linear + lm_head", LoRAConfig(rank=16, targets=ALL_LINEAR_AND_HEAD), "", {}),
    ("QLoRA r16 all-linear + lm_head", QLoRAConfig(rank=16, targets=ALL_LINEAR_AND_HEAD), "", {}),
]


def packed_batch(vocab_size: int, setup: TrainSetup, generator: torch.Generator) -> dict:
    """One packed micro-batch as a `--packed` run gets it: random documents of 1/8 to 3/4 of a row
    joined by lowrank.data.packed_rows (position ids restart per document, boundary labels -100),
    checked to be what transformers treats as packed (a block-diagonal mask, not the causal path)."""
    from transformers.masking_utils import find_packed_sequence_indices

    documents, tokens = [], 0
    while tokens < setup.batch_size * setup.seq_len:
        length = int(torch.randint(setup.seq_len // 8, 3 * setup.seq_len // 4, (), generator=generator))
        documents.append(torch.randint(0, vocab_size, (length,), generator=generator).tolist())
        tokens += length
    batch = packed_rows(documents, setup.seq_len).select(torch.arange(setup.batch_size))
    assert find_packed_sequence_indices(batch["position_ids"]) is not None, "the batch is not packed"
    return batch


def measure(model_name: str, method, setup: TrainSetup, device: str = "cpu") -> tuple[dict, dict]:
    """One warm-up step, then the measured step. On CUDA the allocator's peak is the measurement
    (`peak_bytes`) and the tracker's peak of tensors alone is kept beside it."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=setup.attn_implementation).to(device)
    prepared = prepare(model, method, setup, lr=1e-4)
    if setup.packed:
        generator = torch.Generator().manual_seed(0)
        batches = [{k: v.to(device) for k, v in packed_batch(config.vocab_size, setup, generator).items()}
                   for _ in range(setup.grad_accum)]
    else:
        ids = torch.randint(0, config.vocab_size, (setup.batch_size, setup.seq_len), device=device)
        batches = [{"input_ids": ids, "labels": ids}] * setup.grad_accum
    measured = measure_steady_step(prepared, batches, setup).to_dict()
    if device == "cuda":
        measured["tracker_peak_bytes"] = measured["peak_bytes"]
        measured["peak_bytes"] = torch.cuda.max_memory_allocated()
    predicted = estimate_spec(load_spec(model_name), method, setup, device=device)
    return predicted.to_dict(), measured


def row(model: str, label: str, setting: str, predicted: dict, measured: dict) -> str:
    check = compare_memory(predicted, measured)
    worst = max(check.category_errors.items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
    ok = "✓" if check.ok else "✗ " + ", ".join(check.failures)
    return (f"| {model} | {label} | {setting} | {predicted['peak_bytes'] / MiB:,.1f} | "
            f"{measured['peak_bytes'] / MiB:,.1f} | {100 * check.peak_error:+.2f}% | "
            f"{predicted['phase']} / {measured['phase']} | {worst[0]} {100 * worst[1]:+.1f}% | {ok} |")


def dry_run_rows() -> list[str]:
    from lowrank.dryrun import dry_run

    from dryrun_7b import METHODS as SEVEN_B

    setup = TrainSetup(batch_size=1, seq_len=256)
    rows = []
    for label, method in SEVEN_B.values():
        start = time.perf_counter()
        measured = dry_run("llama-7b", method, setup, device="cuda").to_dict()
        seconds = time.perf_counter() - start
        predicted = estimate_spec(load_spec("llama-7b"), method, setup, device="cuda").to_dict()
        rows.append(row("llama-7b (fake tensors)", label, f"1×256 · {seconds:.0f} s", predicted, measured))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run-7b", action="store_true")
    parser.add_argument("--levers", action="store_true",
                        help="after the methods: the chunked loss, packing, modules_to_save, LoRA on lm_head")
    parser.add_argument("--levers-only", action="store_true", help="the levers' rows alone")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: measure with the allocator's statistics (bench/gpu_check.sh)")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated presets (default: {','.join(MODELS)}; the levers: "
                             f"{','.join(LEVER_MODELS)})")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(1)
    models = args.models.split(",") if args.models else MODELS
    models = models[:1] if args.quick else models
    setups = SETUPS[:1] if args.quick else SETUPS
    rows = [] if args.levers_only else [(model, label, method, setting, setup) for model in models
                                        for label, method in METHODS for setting, setup in setups]
    if args.levers or args.levers_only:
        rows += [(model, label, method, f"{setting} · {name}" if name else setting, replace(setup, **change))
                 for model in (args.models.split(",") if args.models else LEVER_MODELS)
                 for label, method, name, change in LEVERS for setting, setup in LEVER_SETUPS]
    print("| model | method | batch×seq | predicted MiB | measured MiB | peak error | phase (pred / meas) "
          "| largest category error | targets |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    failures = total = 0
    for model, label, method, setting, setup in rows:
        predicted, measured = measure(model, method, setup, args.device)
        total += 1
        failures += not compare_memory(predicted, measured).ok
        print(row(model, label, setting, predicted, measured), flush=True)
    if args.dry_run_7b:
        for line in dry_run_rows():
            total += 1
            failures += "✗" in line
            print(line, flush=True)
    print(f"\n{total - failures} of {total} rows within the targets")


if __name__ == "__main__":
    main()
