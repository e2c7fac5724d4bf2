"""GaLore benchmarks: subspace refresh time, loss and step time, optimizer-state bytes.

1. Refresh: the SVD of one fp32 gradient and the projection into it, for paper-sized shapes —
   ours randomized, ours exact, galore-torch's `GaLoreProjector` (exact SVD; rank does not change
   its cost, so it runs once per shape). Median of `--repeats` for the randomized one.
2. Training on a small byte-level Llama (pydoc text shipped with Python): held-out loss after
   the same steps with randomized and exact SVD (and AdamW for scale), and the time of T steps
   (T = update_proj_gap, so one refresh amortized) relative to torch's AdamW on the same model.
3. Optimizer state of the GaLore paper's llama-60m after one step: bytes of every tensor (whole
   storages: a view keeps its base alive) and the transient peak of the optimizer step measured
   with lowrank.memory.MemoryTracker, ours (fp32, bf16, 8-bit) against galore-torch.

    python bench/galore_bench.py             # ~10 minutes on one thread (most of it: exact SVDs; pip install -e . first)
    python bench/galore_bench.py --quick     # smaller shapes and models, under a minute
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from estimator.config import GaLoreConfig, TrainSetup
from lowrank.galore import build_galore_optimizer, galore_param_groups
from lowrank.methods import LowRankOptimizer, Prepared
from lowrank.projector import GaLoreProjector
from lowrank.recipe import evaluate_model
from lowrank.step import measure_optimizer_step, train_on

MODELS = {  # hidden, intermediate, heads, layers, vocab
    "llama-60m": (512, 1376, 8, 8, 32000),  # the GaLore paper's smallest model
    "byte-4l": (256, 688, 4, 4, 256),
    "byte-tiny": (128, 344, 4, 2, 256),
}


def build_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter, heads, layers, vocab = MODELS[name]
    config = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                  num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                                  rms_norm_eps=1e-6, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def reference_galore(model: torch.nn.Module, cfg: GaLoreConfig, lr: float, eps: float = 1e-8):
    from galore_torch import GaLoreAdamW as ReferenceAdamW
    from galore_torch import GaLoreAdamW8bit as Reference8bit

    groups = galore_param_groups(model, cfg)
    params = [{"params": [p for _, p in groups[0]["params"]], "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap,
               "scale": cfg.scale, "proj_type": cfg.proj_type}, {"params": [p for _, p in groups[1]["params"]]}]
    if cfg.optimizer == "adamw8bit":
        return Reference8bit(params, lr=lr, eps=eps, weight_decay=0.0)
    return ReferenceAdamW(params, lr=lr, eps=eps, weight_decay=0.0, no_deprecation_warning=True)


# ---------------------------------------------------------------------------- 1. refresh time
def timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(grad: torch.Tensor, rank: int, svd: str) -> None:
    projector = GaLoreProjector(tuple(grad.shape), rank, 200, svd=svd)
    projector.refresh(grad, 0)
    projector.project(grad)


def theirs(grad: torch.Tensor, rank: int) -> None:
    from galore_torch.galore_projector import GaLoreProjector as ReferenceProjector

    ReferenceProjector(rank, update_proj_gap=200).project(grad, 0)


def refresh_table(shapes: list[tuple[int, int]], ranks: list[int], repeats: int) -> None:
    print("\n## 1. Subspace refresh: SVD + projection of one fp32 gradient (seconds)")
    print(f"{'shape':<13}{'rank':>6}{'randomized':>12}{'exact':>9}{'galore-torch':>14}{'speed-up':>10}")
    warm = torch.randn(64, 64)  # imports and first-call costs stay out of the timings
    ours(warm, 8, "randomized"), ours(warm, 8, "exact"), theirs(warm, 8)
    for m, n in shapes:
        grad = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
        exact = timed(lambda g=grad: ours(g, ranks[0], "exact"))  # a full SVD costs the same at any rank
        reference = timed(lambda g=grad: theirs(g, ranks[0]))
        for rank in ranks:
            fast = timed(lambda g=grad, r=rank: ours(g, r, "randomized"), repeats)
            print(f"{f'{m}×{n}':<13}{rank:>6}{fast:>12.3f}{exact:>9.2f}{reference:>14.2f}{reference / fast:>9.0f}×",
                  flush=True)


# ---------------------------------------------------------------------------- 2. loss and step time
def text_batches(n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """Windows of bytes of the pydoc topics text that ships with Python (vocab 256)."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n".join(topics.values()).encode()), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq, (n, batch), generator=gen)
    return [torch.stack([data[s:s + seq] for s in row]) for row in starts]


def prepared(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Prepared:
    """Any optimizer, ours or galore-torch's, as the training step takes it (no clipping)."""
    lowrank = optimizer if isinstance(optimizer, LowRankOptimizer) else None
    return Prepared(model, optimizer, GaLoreConfig(), lowrank=lowrank)


def as_batches(data: list[torch.Tensor]) -> list[dict]:
    return [{"input_ids": x, "labels": x} for x in data]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[torch.Tensor]) -> float:
    """Seconds for one step per batch (lowrank.step.train_on), at the optimizer's own lr."""
    start = time.perf_counter()
    train_on(prepared(model, optimizer), as_batches(data), TrainSetup(dtype="fp32"))
    return time.perf_counter() - start


def evaluate(model: torch.nn.Module, data: list[torch.Tensor]) -> float:
    return evaluate_model(model, as_batches(data), TrainSetup(dtype="fp32"))


def loss_table(name: str, steps: int, rank: int, gap: int, batch: int, seq: int) -> None:
    print(f"\n## 2a. Held-out loss after {steps} steps: {name}, rank {rank}, gap {gap}, lr 1e-2, scale 0.25, "
          f"batch {batch}×{seq}")
    base = build_model(name)
    data, held_out = text_batches(steps, batch, seq, seed=0), text_batches(8, batch, seq, seed=1)
    print(f"{'optimizer':<22}{'loss':>8}{'vs exact':>10}")
    start = evaluate(base, held_out)
    print(f"{'(initial)':<22}{start:>8.3f}")
    losses = {}
    for svd in ("exact", "randomized"):
        model = copy.deepcopy(base)
        train(model, build_galore_optimizer(model, GaLoreConfig(rank=rank, update_proj_gap=gap, svd=svd), 1e-2), data)
        losses[svd] = evaluate(model, held_out)
    model = copy.deepcopy(base)
    train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data)
    for label, key in (("GaLore, exact SVD", "exact"), ("GaLore, randomized", "randomized")):
        print(f"{label:<22}{losses[key]:>8.3f}{100 * (losses[key] / losses['exact'] - 1):>+9.2f}%")
    print(f"{'AdamW (lr 1e-3)':<22}{evaluate(model, held_out):>8.3f}")


def step_time_table(name: str, rank: int, gap: int, batch: int, seq: int, rounds: int) -> None:
    print(f"\n## 2b. Time of {gap} steps (one refresh amortized) vs torch.optim.AdamW: {name}, rank {rank}, "
          f"batch {batch}×{seq}, median of {rounds} interleaved rounds")
    base = build_model(name)
    data = text_batches(gap, batch, seq, seed=2)
    variants = {
        "torch AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        "GaLore randomized": lambda m: build_galore_optimizer(m, GaLoreConfig(rank=rank, update_proj_gap=gap), 1e-3),
        "GaLore exact": lambda m: build_galore_optimizer(m, GaLoreConfig(rank=rank, update_proj_gap=gap,
                                                                         svd="exact"), 1e-3),
        "GaLore 8-bit": lambda m: build_galore_optimizer(m, GaLoreConfig(rank=rank, update_proj_gap=gap,
                                                                         optimizer="adamw8bit"), 1e-3),
        "GaLore layer-wise": lambda m: build_galore_optimizer(m, GaLoreConfig(rank=rank, update_proj_gap=gap,
                                                                              layerwise=True), 1e-3),
        "galore-torch": lambda m: reference_galore(m, GaLoreConfig(rank=rank, update_proj_gap=gap), 1e-3),
    }
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, make in variants.items():  # a fresh optimizer each round: its first step refreshes
            model = copy.deepcopy(base)
            times[label].append(train(model, make(model), data))
    adamw = statistics.median(times["torch AdamW"])
    print(f"{'optimizer':<20}{'ms/step':>9}{'vs AdamW':>10}")
    for label, values in times.items():
        t = statistics.median(values)
        print(f"{label:<20}{1000 * t / gap:>9.1f}{t / adamw:>9.2f}×")


# ---------------------------------------------------------------------------- 3. optimizer state
def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def state_tensors(optimizer: torch.optim.Optimizer, params: set[int] | None = None) -> list[torch.Tensor]:
    """Tensors in the state of `params` (ids; all by default), projection matrices included."""
    found = []
    for p, state in optimizer.state.items():
        if params is not None and id(p) not in params:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, GaLoreProjector):
                found += value.state_tensors()
            elif hasattr(value, "ortho_matrix"):  # galore-torch's projector: a tensor or [left, right]
                matrix = value.ortho_matrix
                found += list(matrix) if isinstance(matrix, list) else [matrix]
    return found


def state_table(name: str, rank: int) -> None:
    hidden, inter, heads, layers, vocab = MODELS[name]
    print(f"\n## 3. Optimizer state after one step: {name} (hidden {hidden}, intermediate {inter}, {layers} layers, "
          f"vocab {vocab}), rank {rank}, all-linear targets")
    print(f"{'optimizer':<24}{'dtype':>6}{'state MiB':>11}{'projected MiB':>15}{'step transient MiB':>20}")
    cfg = GaLoreConfig(rank=rank, update_proj_gap=200, svd="randomized")
    rows = [("torch AdamW", "fp32"), ("torch AdamW", "bf16"), ("ours", "fp32"), ("ours", "bf16"), ("ours 8-bit", "fp32"),
            ("ours 8-bit", "bf16"), ("galore-torch", "fp32"), ("galore-torch", "bf16"), ("galore-torch 8-bit", "bf16")]
    for label, dtype_name in rows:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        model = build_model(name, dtype)
        projected = {id(p) for _, p in galore_param_groups(model, cfg)[0]["params"]}
        try:
            if label == "torch AdamW":
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
            elif label.startswith("ours"):
                optimizer = build_galore_optimizer(model, GaLoreConfig(rank=rank, optimizer="adamw8bit" if "8-bit" in label
                                                                       else "adamw"), 1e-3)
            else:
                optimizer = reference_galore(model, GaLoreConfig(rank=rank, optimizer="adamw8bit" if "8-bit" in label
                                                                 else "adamw"), 1e-3)
            transient = []
            for _ in range(2):  # the second step is steady state: states exist
                for p in model.parameters():
                    p.grad = torch.randn_like(p)
                transient.append(measure_optimizer_step(prepared(model, optimizer)).breakdown["transient"])
        except Exception as error:  # galore-torch's 8-bit optimizer needs CUDA
            print(f"{label:<24}{dtype_name:>6}   fails on CPU: {type(error).__name__}: {str(error)[:60]}")
            continue
        tensors, proj = state_tensors(optimizer), state_tensors(optimizer, projected)
        print(f"{label:<24}{dtype_name:>6}{storage_bytes(tensors) / 2**20:>11.1f}{storage_bytes(proj) / 2**20:>15.1f}"
              f"{transient[-1] / 2**20:>20.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, models and runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: with more, MKL's threads collapse when other "
                             "processes share the cores")
    parser.add_argument("--only", default="1,2,3", help="which tables, e.g. 1,3")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tables = set(args.only.split(","))
    if args.quick:
        shapes, ranks, repeats = [(1024, 1024), (1024, 2752)], [64, 256], 3
        model, steps, rounds = "byte-tiny", 60, 1
    else:
        shapes, ranks, repeats = [(4096, 4096), (4096, 11008)], [128, 512], 3
        model, steps, rounds = "byte-4l", 300, 2
    if "1" in tables:
        refresh_table(shapes, ranks, repeats)
    if "2" in tables:
        loss_table(model, steps, rank=32, gap=50, batch=8, seq=64)
        step_time_table(model, rank=32, gap=50, batch=8, seq=128, rounds=rounds)
    if "3" in tables:
        state_table("byte-4l" if args.quick else "llama-60m", rank=32 if args.quick else 128)


if __name__ == "__main__":
    main()
