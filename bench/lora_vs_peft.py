"""Step time and peak memory of our LoRA against peft's on the same model.

One step = forward + backward + AdamW step + zero_grad. Both models are built from the same
random weights, with the same targets, rank, alpha and dtype; their steps alternate so that
load from other processes hits both alike. Reported: the median of `--steps` timed steps after
`--warmup` steps (ratio = ours / peft; "min ratio" compares the fastest steps, which shared CPUs
disturb least), and the peak of one steady-state step measured by `lowrank.memory.MemoryTracker`.
peft upcasts bf16 adapters to fp32 by default; here both keep adapters in the model dtype.

    python bench/lora_vs_peft.py              # ~21M-parameter Llama, fp32 and bf16, rank 8 and 64
    python bench/lora_vs_peft.py --quick      # a tiny model, a few seconds
    python bench/lora_vs_peft.py --threads 1 --cpu-time   # steadier on a CPU shared with others
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from estimator.config import LoRAConfig, TrainSetup
from estimator.targets import target_linears
from lowrank.lora import apply_lora, lora_parameters
from lowrank.methods import Prepared
from lowrank.step import measure_step, training_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {  # hidden, intermediate, heads, kv heads, layers, vocab
    "llama-21m": (384, 1024, 6, 6, 6, 16000),
    "tiny": (64, 128, 4, 2, 2, 128),
}


def build_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter, heads, kv, layers, vocab = MODELS[name]
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                  num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def peft_lora(model: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    names = sorted({path.rsplit(".", 1)[-1] for path, _ in target_linears(model, cfg.targets)})
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
                        use_rslora=cfg.use_rslora, task_type="CAUSAL_LM")
    # peft's default upcasts bf16 adapters to fp32; compare like with like (both in the model dtype)
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


SETUP = TrainSetup()  # no autocast; the models are already in their dtype


def peak_bytes(prepared: Prepared, ids: torch.Tensor) -> int:
    return measure_step(prepared, [{"input_ids": ids, "labels": ids}], SETUP)[1].peak_bytes


def timed_step(prepared: Prepared, ids: torch.Tensor, cpu_time: bool) -> float:
    """Seconds of one training step (lowrank.step): wall clock (CUDA synchronized), or this thread's CPU time."""
    clock = time.thread_time if cpu_time else time.perf_counter
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = clock()
    training_step(prepared, [{"input_ids": ids, "labels": ids}], SETUP)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return clock() - start


def compare(args: argparse.Namespace, dtype: str, rank: int) -> dict:
    cfg = LoRAConfig(rank=rank, alpha=2 * rank, targets="all-linear")
    base = build_model(args.model, DTYPES[dtype]).to(args.device)
    ours, theirs = apply_lora(copy.deepcopy(base), cfg), peft_lora(base, cfg)
    runs = {"ours": Prepared(ours, torch.optim.AdamW(lora_parameters(ours), lr=1e-4), cfg),
            "peft": Prepared(theirs, torch.optim.AdamW(trainable(theirs), lr=1e-4), cfg)}
    ids = torch.randint(0, MODELS[args.model][-1], (args.batch_size, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for i in range(args.warmup + args.steps):
        for name in ("ours", "peft") if i % 2 == 0 else ("peft", "ours"):
            seconds = timed_step(runs[name], ids, args.cpu_time)
            if i >= args.warmup:
                times[name].append(seconds)
    row = {"dtype": dtype, "rank": rank}
    for name in ("ours", "peft"):
        row[f"{name}_ms"] = 1000 * statistics.median(times[name])
        row[f"{name}_peak"] = peak_bytes(runs[name], ids)
    row["ratio"] = row["ours_ms"] / row["peft_ms"]
    row["min_ratio"] = min(times["ours"]) / min(times["peft"])  # less sensitive to load from other processes
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer steps (a smoke test)")
    parser.add_argument("--model", choices=tuple(MODELS), default="llama-21m")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time this thread's CPU time instead of the wall clock; with --threads 1 on a "
                             "shared CPU it ignores time given to other processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.ranks, args.warmup, args.steps = "tiny", "8", 1, 5
    warnings.filterwarnings("ignore")
    hidden, inter, heads, kv, layers, vocab = MODELS[args.model]
    n_params = sum(p.numel() for p in build_model(args.model, torch.float32).parameters())
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters (hidden {hidden}, intermediate {inter}, {layers} layers, "
          f"vocab {vocab}); batch {args.batch_size}×{args.seq_len}; targets all-linear; "
          f"{args.device}, {torch.get_num_threads()} threads; median of {args.steps} steps after {args.warmup} "
          f"({'thread CPU time' if args.cpu_time else 'wall clock'})")
    print(f"{'dtype':<6}{'rank':>6}{'ours ms':>10}{'peft ms':>10}{'ratio':>8}{'min ratio':>11}"
          f"{'ours peak MiB':>15}{'peft peak MiB':>15}")
    for dtype in args.dtypes.split(","):
        for rank in (int(r) for r in args.ranks.split(",")):
            r = compare(args, dtype, rank)
            print(f"{r['dtype']:<6}{r['rank']:>6}{r['ours_ms']:>10.1f}{r['peft_ms']:>10.1f}{r['ratio']:>8.2f}{r['min_ratio']:>11.2f}"
                  f"{r['ours_peak'] / 2**20:>15.1f}{r['peft_peak'] / 2**20:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
