"""Run by torchrun (tests/distributed/test_chunked_loss.py): the chunked loss on N ranks trains to the
weights of one process with transformers' full loss — under DDP, ZeRO-1 and FSDP2 (lm_head gathered by
the root's hooks for the chunks, its gradient reduce-scattered), with tied embeddings and two
accumulated micro-batches. Prints one JSON line per case on rank 0."""

from __future__ import annotations

import dataclasses
import gc
import json
import warnings

import torch
import torch.distributed as dist

import tests.distributed.equivalence as eq
from estimator.config import FullConfig, LoRAConfig, TrainSetup
from lowrank.distributed import Parallel

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
CASES = [("full", FullConfig(), ("none", "optimizer", "gradients", "full")), ("lora", LoRAConfig(rank=4), ("full",))]


def main() -> None:
    tiny = eq.tiny_model
    eq.tiny_model = lambda kind, seed=0: tiny(kind, seed=seed, tie_word_embeddings=True)
    env = Parallel.from_env("none")
    for name, method, strategies in CASES:
        setup = TrainSetup(batch_size=eq.ROWS, seq_len=eq.SEQ, dtype="fp32", grad_accum=2)
        reference, ref_losses, _ = eq.train(method, setup, None)  # one process, transformers' loss
        chunked = dataclasses.replace(setup, loss="chunked", loss_chunk_tokens=5)
        for strategy in strategies:
            state, losses, _ = eq.train(method, chunked, Parallel(strategy, env.world, env.rank, env.device))
            worst, beyond = eq.compare(state, reference)
            if env.is_main:
                print(json.dumps({"method": name, "shard": strategy, "worst_relative": worst, "beyond": beyond,
                                  "losses": losses, "reference_losses": ref_losses}), flush=True)
    gc.collect()  # FSDP2's reference cycles hold Gloo work: collected first, or exit may std::terminate
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
