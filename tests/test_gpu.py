"""CUDA: every method trains on the GPU and the estimate meets the allocator's measured peak.

Skipped without CUDA; bench/gpu_check.sh runs these with `-m gpu` on a lent GPU.
"""

from __future__ import annotations

import pytest
import torch

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate_spec
from estimator.spec import spec_from_config
from lowrank.methods import prepare
from lowrank.step import measure_steady_step, training_step
from tests.helpers import tiny_config

pytestmark = pytest.mark.gpu
WIDE = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4,
            num_hidden_layers=2, vocab_size=8192)
METHODS = [FullConfig(), LoRAConfig(rank=16), QLoRAConfig(rank=16), GaLoreConfig(rank=64),
           GaLoreConfig(rank=64, optimizer="adamw8bit", layerwise=True), QGaLoreConfig(rank=64)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.method + ("-lw" if getattr(m, "layerwise", 0) else ""))
def test_each_method_on_cuda_meets_the_estimate(gpu, method):
    from transformers import AutoModelForCausalLM

    setup = TrainSetup(batch_size=8, seq_len=512, dtype="bf16")
    config = tiny_config("llama", **WIDE)
    torch.manual_seed(0)
    prepared = prepare(AutoModelForCausalLM.from_config(config).to(gpu), method, setup, lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (8, 512), device=gpu)
    batches = [{"input_ids": ids, "labels": ids}]
    first = training_step(prepared, batches, setup).loss
    measured = measure_steady_step(prepared, batches, setup)  # steps 2 and 3, the allocator's peak reset between
    allocated = torch.cuda.max_memory_allocated()
    last = training_step(prepared, batches, setup).loss
    predicted = estimate_spec(spec_from_config(config, "wide"), method, setup, device="cuda")
    assert last < first
    assert abs(predicted.peak_bytes - measured.peak_bytes) / measured.peak_bytes < 0.05  # tensors, by category
    assert abs(predicted.peak_bytes - allocated) / allocated < 0.10  # the allocator adds cuBLAS workspaces
