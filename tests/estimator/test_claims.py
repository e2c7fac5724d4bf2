"""The papers' headline claims come out of the estimator (numbers in README)."""

from __future__ import annotations

from estimator.config import GaLoreConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate

GB = 10**9
GiB = 2**30


def test_galore_8bit_layerwise_llama_7b_fits_a_24gb_gpu():
    # GaLore §5.3: LLaMA 7B pre-training, batch 1 × 256 tokens, no checkpointing or offloading
    est = estimate("llama-7b", GaLoreConfig(rank=1024, update_proj_gap=500, optimizer="adamw8bit", layerwise=True),
                   TrainSetup(batch_size=1, seq_len=256, dtype="bf16"))
    assert est.total_bytes <= 24 * GiB
    without = estimate("llama-7b", GaLoreConfig(rank=1024, optimizer="adamw8bit", layerwise=False),
                       TrainSetup(batch_size=1, seq_len=256, dtype="bf16"))
    assert without.total_bytes > 24 * GiB  # layer-wise updates are what make it fit


def test_qgalore_llama_7b_fits_16gb():
    # Q-GaLore abstract: LLaMA-7B from scratch on a 16 GB RTX 4060 Ti
    est = estimate("llama-7b", QGaLoreConfig(rank=1024, update_proj_gap=500),
                   TrainSetup(batch_size=1, seq_len=256, dtype="bf16"))
    assert est.total_bytes <= 16 * GiB


def test_qlora_65b_fits_48gb():
    # QLoRA §1: a 65B model on a single 48 GB GPU, batch 1 with gradient checkpointing
    est = estimate("llama-65b", QLoRAConfig(rank=64, alpha=16, dropout=0.05, targets="all-linear"),
                   TrainSetup(batch_size=1, seq_len=512, dtype="bf16", grad_checkpointing=True))
    assert est.total_bytes <= 48 * GB
