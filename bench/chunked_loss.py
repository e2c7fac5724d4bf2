"""The chunked loss (`--loss chunked`): predicted beside measured, and what it saves at a 128k vocabulary.

    python bench/chunked_loss.py            # ~3 minutes on two cores
    python bench/chunked_loss.py --quick    # the 128k-vocabulary table only

1. Predicted vs measured: the estimate beside one step on fake tensors (`lowrank.dryrun.dry_run`,
   the real code, measured storage by storage) for llama3.1-8b (vocabulary 128,256) and llama-7b
   (32,000) at batch 1 × 2048, and beside a real CPU step of tiny-llama-20m at 4 × 128.
2. The saving: peak with the full loss and with the chunked loss (default chunk), both measured.
3. The chunk size: time of the head alone (lm_head, fp32 upcast, cross-entropy, forward and
   backward) on this CPU against transformers' full loss, and the chunk's own bytes at 128k.
Targets as everywhere: the peak within 1% here, every category ≥10% of the peak within 5%.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate
from estimator.loss import DEFAULT_CHUNK_TOKENS
from lowrank.report import compare_memory

GiB = 2**30
METHODS = [("full AdamW", FullConfig()), ("LoRA r64", LoRAConfig(rank=64)), ("QLoRA r64", QLoRAConfig(rank=64)),
           ("GaLore r1024 8-bit layer-wise", GaLoreConfig(rank=1024, optimizer="adamw8bit", layerwise=True))]


def dry_run_pair(model: str, method, setup: TrainSetup) -> tuple[dict, dict, float]:
    from lowrank.dryrun import dry_run

    start = time.perf_counter()
    measured = dry_run(model, method, setup, device="cpu").to_dict()
    seconds = time.perf_counter() - start
    return estimate(model, method, setup, device="cpu").to_dict(), measured, seconds


def accuracy_row(model: str, label: str, setting: str, predicted: dict, measured: dict, seconds: float) -> str:
    check = compare_memory(predicted, measured)
    worst = max(check.category_errors.items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
    return (f"| {model} | {label} | {setting} | {predicted['peak_bytes'] / GiB:,.3f} | "
            f"{measured['peak_bytes'] / GiB:,.3f} | {100 * check.peak_error:+.2f}% | {predicted['moment']} | "
            f"{worst[0]} {100 * worst[1]:+.1f}% | {seconds:.0f} s | {'✓' if check.ok else '✗'} |")


def head_speed(tokens: int = 2048, hidden: int = 1024, vocab: int = 32000, reps: int = 3) -> list[str]:
    """Forward and backward of the head alone against transformers' loss: each setting's best of
    `reps` rounds, the settings interleaved within a round (a shared machine's load hits them alike)."""
    from lowrank.loss import chunked_cross_entropy, shifted_targets

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    settings = {"full": lambda: torch.nn.functional.cross_entropy(head(x).float().view(-1, vocab),
                                                                  shifted_targets(labels))}
    for chunk in (64, 128, 256, 512, 1024):
        settings[chunk] = lambda chunk=chunk: chunked_cross_entropy(x, head, labels, chunk)
    best = dict.fromkeys(settings, float("inf"))
    for _ in range(reps):
        for key, loss in settings.items():
            head.weight.grad = x.grad = None
            start = time.perf_counter()
            loss().backward()
            best[key] = min(best[key], time.perf_counter() - start)
    rows = [f"| full (transformers) | {best['full']:.2f} | 1.00× | {tokens * 128256 * 6 / GiB:.2f} |"]
    for chunk in (64, 128, 256, 512, 1024):
        rows.append(f"| {chunk}{' (default)' if chunk == DEFAULT_CHUNK_TOKENS else ''} | {best[chunk]:.2f} | "
                    f"{best[chunk] / best['full']:.2f}× | {chunk * 128256 * 6 / GiB:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    full, chunked = TrainSetup(batch_size=1, seq_len=2048), TrainSetup(batch_size=1, seq_len=2048, loss="chunked")

    print("#### llama3.1-8b (vocabulary 128,256), batch 1 × 2048, bf16: measured on fake tensors\n")
    print("| method | full loss GiB | chunked GiB | saved GiB | saved | chunked: predicted GiB | error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")

    def row(label: str, method, full_setup: TrainSetup, chunked_setup: TrainSetup) -> bool:
        """One line: the full loss's dry-run peak, the chunked one's, the saving, the estimate's error."""
        _, base, _ = dry_run_pair("llama3.1-8b", method, full_setup)
        predicted, measured, _ = dry_run_pair("llama3.1-8b", method, chunked_setup)
        check = compare_memory(predicted, measured)
        saved = base["peak_bytes"] - measured["peak_bytes"]
        print(f"| {label} | {base['peak_bytes'] / GiB:.2f} | {measured['peak_bytes'] / GiB:.2f} | {saved / GiB:.2f} | "
              f"{100 * saved / base['peak_bytes']:.1f}% | {predicted['peak_bytes'] / GiB:.2f} | "
              f"{100 * check.peak_error:+.2f}% |", flush=True)
        return check.ok

    failures = sum(not row(label, method, full, chunked) for label, method in METHODS)
    long_full, long_chunked = TrainSetup(batch_size=1, seq_len=8192), TrainSetup(batch_size=1, seq_len=8192,
                                                                                 loss="chunked")
    failures += sum(not row(f"{label}, 1 × 8192", method, long_full, long_chunked)
                    for label, method in METHODS[1:3])  # at 8192 tokens
    if args.quick:
        return

    print("\n#### Predicted beside measured with `--loss chunked`\n")
    print("| model | method | batch×seq | predicted GiB | measured GiB | peak error | predicted moment | "
          "largest category error | time | targets |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, method in METHODS:
        predicted, measured, seconds = dry_run_pair("llama-7b", method, chunked)
        failures += not compare_memory(predicted, measured).ok
        print(accuracy_row("llama-7b (fake tensors)", label, "1×2048", predicted, measured, seconds), flush=True)
    setup = TrainSetup(batch_size=4, seq_len=128, loss="chunked")
    for label, method in [("full AdamW", FullConfig()), ("LoRA r16", LoRAConfig(rank=16))]:
        predicted, measured, seconds = real_step("tiny-llama-20m", method, setup)
        failures += not compare_memory(predicted, measured).ok
        print(accuracy_row("tiny-llama-20m (real CPU step)", label, "4×128", predicted, measured, seconds), flush=True)

    print("\n#### The chunk: head alone, 2048 tokens × hidden 1024 × vocabulary 32,000, fp32 on this CPU\n")
    print("| chunk tokens | forward + backward s | vs full | its logits at 128k vocab, bf16 + fp32 copy (GiB) |")
    print("| --- | --- | --- | --- |")
    for line in head_speed():
        print(line, flush=True)
    print(f"\n{'all rows within the targets' if not failures else f'{failures} rows outside the targets'}")


def real_step(model: str, method, setup: TrainSetup) -> tuple[dict, dict, float]:
    """One warm-up step, then the measured step of a real model on this CPU (as estimator_accuracy.py)."""
    from estimator_accuracy import measure

    start = time.perf_counter()
    predicted, measured = measure(model, method, setup)
    return predicted, measured, time.perf_counter() - start


if __name__ == "__main__":
    main()
