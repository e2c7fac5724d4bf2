"""The papers in miniature: pre-training (GaLore Table 2, Q-GaLore Table 1) and fine-tuning, on CPU.

Pre-training: one small Llama, our BPE tokenizer, the corpus that ships with Python, a fixed
token budget, seven ways — full AdamW, GaLore, 8-bit GaLore, Q-GaLore, LoRA used for pre-training
(on a frozen random base; and as GaLore's paper runs it, with embeddings, norms and lm_head
trained too), and a pure low-rank factorization W = BA. The papers' pattern: full ≈ GaLore ≈ Q-GaLore (within a
few percent), LoRA behind, low-rank far behind; memory in the papers' order.

Fine-tuning: pre-train a base (full AdamW), then fine-tune it on a prompt/response task this
script generates from Python's standard library (a function's signature and docstring → its
body: code, a new domain for a base that read prose; held-out functions for eval; loss on the
response) with full, LoRA, QLoRA, GaLore and Q-GaLore, starting from the base's own loss on it.

    python bench/reproduce.py                  # ~30 minutes on two cores; tables + assets/reproduce_*.png
    python bench/reproduce.py --quick          # a couple of minutes, a smoke test of the same code
    python bench/reproduce.py --part finetune  # just one part

Every run is the recipe of `python -m lowrank.train` (lowrank/recipe.py: its schedule, clipping,
steps and evaluation) over a model built here; memory is the measured peak of one steady-state
step (live tensor storages). Needs the packages installed (`pip install -e .`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from estimator.config import (
    FullConfig,
    GaLoreConfig,
    LoRAConfig,
    MethodConfig,
    QGaLoreConfig,
    QLoRAConfig,
    TrainSetup,
)
from estimator.spec import load_config
from estimator.targets import target_linears
from lowrank.data import code_task, load_data
from lowrank.full import build_optimizer
from lowrank.recipe import RunSpec, evaluate, evaluate_model, run_steps, session_for_model

ROOT = Path(__file__).resolve().parents[1]

MiB = 2**20


@dataclass
class Result:
    name: str
    losses: list[float] = field(default_factory=list)
    eval_loss: float = math.nan
    peak_bytes: int = 0
    tokens_per_s: float = 0.0
    trainable: int = 0
    svd_count: int = 0  # GaLore / Q-GaLore: subspace refreshes over the run, all layers
    seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.eval_loss)


class LowRankLinear(nn.Module):
    """y = B(A x): a rank-r factorization trained from scratch (the papers' "Low-Rank" baseline)."""

    def __init__(self, linear: nn.Linear, rank: int) -> None:
        super().__init__()
        self.A = nn.Linear(linear.in_features, rank, bias=False, dtype=linear.weight.dtype)
        self.B = nn.Linear(rank, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


class LoRAWithEmbeddings(LoRAConfig):
    """LoRA as GaLore's paper pre-trains it (ReLoRA-style): A and B on every linear, and the
    embeddings, norms and lm_head trained too (§C.2 counts them as low-rank parameters)."""


def unfreeze_non_linear(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if "lora_" not in name and ("embed" in name or "norm" in name or "lm_head" in name):
            p.requires_grad_(True)


def factorize(model: nn.Module, rank: int) -> nn.Module:
    for name, linear in target_linears(model, "all-linear"):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LowRankLinear(linear, rank))
    return model


def run(name: str, model: nn.Module, method: MethodConfig, setup: TrainSetup, data, steps: int, lr: float,
        eval_batches: int) -> Result:
    """Train `steps` steps with the trainer's recipe; step 2 is measured by category."""
    spec = RunSpec(name, method, setup, steps=steps, lr=lr, eval_batches=eval_batches)
    session = session_for_model(spec, model, data)
    if isinstance(method, LoRAWithEmbeddings):  # the registry prepared plain LoRA: unfreeze the rest too
        unfreeze_non_linear(session.prepared.model)
        session.prepared.optimizer = build_optimizer(session.prepared.model.parameters(), method.optimizer, lr)
    result = Result(name, trainable=session.prepared.trainable_parameters())
    for step in run_steps(session):
        result.losses.append(step.loss)
        result.seconds += step.seconds
        result.peak_bytes = step.measured["peak_bytes"] if step.measured else result.peak_bytes
    result.tokens_per_s = steps * setup.tokens * setup.grad_accum / result.seconds
    if session.prepared.lowrank is not None:
        result.svd_count = sum(row["svd_count"] for row in session.prepared.lowrank.layer_info())
    result.eval_loss = evaluate(session)
    print(f"  {name:<22} eval loss {result.eval_loss:.3f}  peak {result.peak_bytes / MiB:7.1f} MiB  "
          f"{result.tokens_per_s:,.0f} tok/s  ({result.seconds:.0f} s)", file=sys.stderr, flush=True)
    return result


def new_model(preset: str, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(load_config(preset))


def pretraining(args) -> list[Result]:
    """Six methods, the same data, seed and token budget."""
    setup = TrainSetup(batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32")
    rank = args.rank
    methods = [
        ("Full AdamW", FullConfig(), args.lr_full),
        (f"GaLore r{rank}", GaLoreConfig(rank=rank, update_proj_gap=args.gap, scale=0.25), args.lr_galore),
        (f"8-bit GaLore r{rank}", GaLoreConfig(rank=rank, update_proj_gap=args.gap, scale=0.25,
                                               optimizer="adamw8bit"), args.lr_galore),
        (f"Q-GaLore r{rank}", QGaLoreConfig(rank=rank, update_proj_gap=args.gap, scale=0.25), args.lr_galore),
        (f"LoRA r{rank} (A, B only)", LoRAConfig(rank=rank, alpha=2 * rank), args.lr_lora),
        (f"LoRA r{rank} + embeddings, norms", LoRAWithEmbeddings(rank=rank, alpha=2 * rank), args.lr_lora),
        (f"Low-Rank r{rank}", FullConfig(), args.lr_full),
    ]
    results = []
    for name, method, lr in methods:
        data = load_data(None, None, load_config(args.model).vocab_size, setup.seq_len, setup.batch_size, args.seed,
                         ROOT / "runs" / ".cache")
        model = new_model(args.model, args.seed)
        if name.startswith("Low-Rank"):
            factorize(model, rank)
        results.append(run(name, model, method, setup, data, args.steps, lr, args.eval_batches))
    return results


def make_task(path: Path) -> Path:
    """The docstring → body task of lowrank.data.code_task as a .jsonl file."""
    path.write_text("".join(json.dumps(record) + "\n" for record in code_task()))
    return path


def finetuning(args) -> list[Result]:
    """Pre-train a base with full AdamW, then fine-tune it five ways on the generated code task."""
    setup = TrainSetup(batch_size=args.batch_size, seq_len=args.seq_len, dtype="fp32")
    base_dir = ROOT / "runs" / "reproduce-base"
    data = load_data(None, None, load_config(args.model).vocab_size, setup.seq_len, setup.batch_size, args.seed,
                     ROOT / "runs" / ".cache")
    print("  pre-training the base (full AdamW)", file=sys.stderr)
    model = new_model(args.model, args.seed)
    run("base", model, FullConfig(), setup, data, args.steps, args.lr_full, args.eval_batches)
    model.save_pretrained(base_dir)
    data.tokenizer.save_pretrained(base_dir)
    task = make_task(ROOT / "runs" / "reproduce-task.jsonl")
    tune_setup = TrainSetup(batch_size=args.batch_size, seq_len=128, dtype="bf16")
    methods = [("Full AdamW", FullConfig(), 3e-4), ("LoRA r16", LoRAConfig(rank=16), 2e-3),
               ("QLoRA r16", QLoRAConfig(rank=16), 2e-3),
               ("GaLore r64", GaLoreConfig(rank=64, update_proj_gap=50, scale=0.25), 1e-3),
               ("Q-GaLore r64", QGaLoreConfig(rank=64, update_proj_gap=50, scale=0.25), 1e-3)]
    from transformers import AutoModelForCausalLM

    def task_data():
        return load_data(str(task), str(base_dir), load_config(args.model).vocab_size, tune_setup.seq_len,
                         tune_setup.batch_size, args.seed, ROOT / "runs" / ".cache", eval_fraction=0.1)

    base = AutoModelForCausalLM.from_pretrained(base_dir).to(torch.bfloat16)
    args.base_task_loss = evaluate_model(base, task_data().eval_batches(args.eval_batches), tune_setup)
    print(f"  {'base, not fine-tuned':<22} eval loss {args.base_task_loss:.3f}", file=sys.stderr)
    results = []
    for name, method, lr in methods:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        results.append(run(name, model, method, tune_setup, task_data(), args.finetune_steps, lr, args.eval_batches))
    return results


def table(title: str, results: list[Result], reference: Result | None = None) -> str:
    lines = [f"### {title}", "", "| method | eval loss | perplexity | vs full | peak memory (MiB) | tokens/s | trainable |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        versus = f"{100 * (r.eval_loss / reference.eval_loss - 1):+.1f}%" if reference else ""
        lines.append(f"| {r.name} | {r.eval_loss:.3f} | {r.perplexity:.1f} | {versus} | {r.peak_bytes / MiB:,.1f} "
                     f"| {r.tokens_per_s:,.0f} | {r.trainable / 1e6:.2f} M |")
    return "\n".join(lines)


def plot(results: list[Result], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        smooth = [sum(r.losses[max(0, i - 9):i + 1]) / len(r.losses[max(0, i - 9):i + 1]) for i in range(len(r.losses))]
        loss_ax.plot(range(1, len(smooth) + 1), smooth, label=r.name)
    loss_ax.set(xlabel="step", ylabel="training loss (10-step mean)", title=title)
    loss_ax.legend(fontsize=8)
    mem_ax.barh([r.name for r in results], [r.peak_bytes / MiB for r in results], color="tab:blue")
    mem_ax.set(xlabel="measured peak of one step (MiB)", title="memory")
    mem_ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--part", choices=("all", "pretrain", "finetune"), default="all")
    parser.add_argument("--model", default="tiny-llama-20m")
    parser.add_argument("--steps", type=int, default=125, help="pre-training steps (token budget = steps × batch × seq)")
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=50, help="update_proj_gap")
    parser.add_argument("--lr-full", type=float, default=2e-3)
    parser.add_argument("--lr-galore", type=float, default=1e-2)
    parser.add_argument("--lr-lora", type=float, default=4e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "assets"), help="where the plots go")
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.finetune_steps, args.eval_batches = "tiny-llama-5m", 12, 6, 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = args.steps * args.batch_size * args.seq_len
    if args.part in ("all", "pretrain"):
        print(f"pre-training {args.model}: {args.steps} steps × {args.batch_size} × {args.seq_len} = {tokens:,} tokens",
              file=sys.stderr)
        results = pretraining(args)
        print(table(f"Pre-training {args.model} on {tokens:,} tokens (fp32, rank {args.rank})", results, results[0]))
        plot(results, f"pre-training {args.model}", out / "reproduce_pretraining.png")
    if args.part in ("all", "finetune"):
        print(f"\nfine-tuning a pre-trained {args.model} on the generated task", file=sys.stderr)
        results = finetuning(args)
        print("\n" + table(f"Fine-tuning a pre-trained {args.model} (bf16, loss on the response)", results, results[0]))
        print(f"\nThe base before fine-tuning: eval loss {args.base_task_loss:.3f} "
              f"(perplexity {math.exp(args.base_task_loss):.1f}) on the task.")
        plot(results, f"fine-tuning {args.model}", out / "reproduce_finetuning.png")


if __name__ == "__main__":
    main()
