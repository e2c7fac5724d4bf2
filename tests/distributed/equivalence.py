"""Run by torchrun (tests/distributed/test_distributed.py): for every method × strategy that can train,
3 steps on N ranks with micro-batch b each must give the parameters of 1 process with micro-batch N·b
on the same tokens. Prints one JSON line per case on rank 0.

    torchrun --nproc-per-node 2 -m tests.distributed.equivalence [METHODS [STRATEGIES [offload]]]

`offload`: the FSDP strategies with CPUOffloadPolicy (--cpu-offload), without the negative control."""

from __future__ import annotations

import gc
import json
import sys
import warnings

import torch
import torch.distributed as dist

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from lowrank.distributed import SHARD_STRATEGIES, Parallel, refusal
from lowrank.memory import _fsdp_params
from lowrank.methods import prepare
from lowrank.step import training_step
from tests.helpers import tiny_model

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
METHODS = {
    "full": FullConfig(),
    "full-8bit": FullConfig(optimizer="adamw8bit"),
    "full-adafactor": FullConfig(optimizer="adafactor"),
    "full-sgd": FullConfig(optimizer="sgd"),
    "lora": LoRAConfig(rank=4),
    "qlora": QLoRAConfig(rank=4, compute_dtype="fp32"),  # fp32 adapters: bf16's own noise is not the point here
    "galore": GaLoreConfig(rank=8, update_proj_gap=2),
    "galore-layerwise": GaLoreConfig(rank=8, update_proj_gap=2, layerwise=True),
    "qgalore": QGaLoreConfig(rank=8, update_proj_gap=2),
}
STEPS, ROWS, SEQ, LR = 3, 4, 16, 1e-2
TOLERANCE = 0.05  # of lr · steps (measured: fp32 Adam 7e-4, 8-bit Adam 5e-3, Q-GaLore's 8-bit embeddings 1.4e-2)


def full_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model, whole (FSDP's shards gathered); Q-GaLore's INT8 weights dequantized."""
    from torch.distributed.tensor import DTensor

    from lowrank.qgalore import int8_linears

    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
             for k, v in model.state_dict().items()}
    for path, layer in int8_linears(model):
        for part in ("weight_codes", "weight_scales", "weight_offsets"):
            state.pop(f"{path}.{part}")
        state[f"{path}.weight"] = layer.dequantize_weight(torch.float32)
        state[f"{path}.step"] = layer.weight_scales.float().max()  # one quantization step of the layer
    return state


def compare(state: dict, reference: dict) -> tuple[float, list[str]]:
    """The largest difference as a share of what training moved a weight (lr · steps), and the
    tensors beyond tolerance. Summing the ranks' gradients rounds differently from one batch, and
    Adam turns that float noise into a full step (±lr) for an element whose gradient is near zero:
    float weights may differ by TOLERANCE · lr · steps. Frozen codes must be equal; Q-GaLore's INT8
    weights may differ by one quantization step per training step (stochastic rounding of a noisy
    update). A wrong reduction (a rank's own gradient) moves nearly every element by up to lr."""
    worst, beyond = 0.0, []
    moved = LR * STEPS
    for key, ref in reference.items():
        if key.endswith(".step"):
            continue
        diff = (state[key].float() - ref.float()).abs().max().item()
        if not ref.is_floating_point():
            tol = 0.0
        elif f"{key.removesuffix('.weight')}.step" in reference:
            tol = (STEPS + 1) * reference[f"{key.removesuffix('.weight')}.step"].item()
        else:
            tol = TOLERANCE * moved
        worst = max(worst, diff / moved)
        if diff > tol:
            beyond.append(f"{key} differs by {diff:.3g} (tolerance {tol:.3g})")
    return worst, beyond


def train(method, setup: TrainSetup, parallel: Parallel | None) -> tuple[dict, list[float], list[bool]]:
    """The trained model's whole state, the step losses, and which FSDP parameters were offloaded."""
    prepared = prepare(tiny_model("llama", seed=0), method, setup, lr=LR, grad_clip=1.0, parallel=parallel)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        batches = []
        for _ in range(setup.grad_accum):
            ids = torch.randint(0, 256, (ROWS, SEQ), generator=gen)
            batch = {"input_ids": ids, "labels": ids}
            batches.append(parallel.local_batch(batch) if parallel else batch)
        losses.append(training_step(prepared, batches, setup).loss)
    offloaded = [p.offload_to_cpu for p in _fsdp_params(prepared.model)]
    return full_state(prepared.model), losses, offloaded


class Unreduced(Parallel):
    """A deliberately broken job (the negative control): each rank trains on its own rows alone."""

    def wrap(self, model, method):
        return model


def main(names: list[str], strategies: list[str], offload: bool = False) -> None:
    parallel_env = Parallel.from_env("none")
    method, setup = METHODS["full"], TrainSetup(batch_size=ROWS, seq_len=SEQ, dtype="fp32")
    if not offload:
        state = train(method, setup, Unreduced("none", parallel_env.world, parallel_env.rank, parallel_env.device))[0]
        worst, beyond = compare(state, train(method, setup, None)[0])
        if parallel_env.is_main:
            print(json.dumps({"method": "full", "shard": "unreduced", "worst_relative": worst, "beyond": beyond}))
    for name in names:
        method = METHODS[name]
        setup = TrainSetup(batch_size=ROWS, seq_len=SEQ, dtype="fp32", grad_accum=2 if "layerwise" in name else 1)
        reference, ref_losses, _ = train(method, setup, None)
        for strategy in strategies:
            if refusal(method, strategy):
                continue
            parallel = Parallel(strategy, parallel_env.world, parallel_env.rank, parallel_env.device, offload=offload)
            state, losses, offloaded = train(method, setup, parallel)
            worst, beyond = compare(state, reference)
            if parallel.is_main:
                print(json.dumps({"method": name, "shard": strategy, "offload": offload, "worst_relative": worst,
                                  "beyond": beyond, "losses": losses, "reference_losses": ref_losses,
                                  "fsdp_params": len(offloaded), "offloaded_params": sum(offloaded)}), flush=True)
    # FSDP2 leaves reference cycles that hold Gloo work; destroying the group before they are
    # collected ends the process in std::terminate now and then (3 runs in 10 of `full full` here)
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else list(METHODS),
         sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHARD_STRATEGIES),
         offload=sys.argv[3:] == ["offload"])
