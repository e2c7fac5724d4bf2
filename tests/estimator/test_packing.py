"""The estimate of packed batches (--packed) against the dry run (lowrank/dryrun.py), which sees
packed rows as a real run does: the block-diagonal mask from the position ids, SDPA's masked path,
RoPE's per-row tables — for a named family and a traced one."""

from __future__ import annotations

import pytest

from estimator.cli import main
from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, TrainSetup
from estimator.estimate import estimate
from lowrank.dryrun import dry_run

METHODS = {"full": FullConfig(), "lora": LoRAConfig(rank=16), "galore": GaLoreConfig(rank=16)}


def _close(model, method, setup):
    predicted = estimate(model, method, setup, device="cpu")
    measured = dry_run(model, method, setup, device="cpu")
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    for category, value in measured.breakdown.items():
        if value >= 0.1 * measured.peak_bytes:
            assert predicted.breakdown.get(category, 0) == pytest.approx(value, rel=0.05), category
    return predicted, measured


@pytest.mark.parametrize("method", ["full", "lora", "galore"])
def test_packed_llama_matches_the_dry_run(method):
    _close("tiny-llama-20m", METHODS[method], TrainSetup(batch_size=4, seq_len=256, packed=True))


@pytest.mark.parametrize("extra", [{"attn_implementation": "eager"}, {"grad_checkpointing": True}])
def test_packed_llama_eager_and_checkpointed(extra):
    _close("tiny-llama-20m", METHODS["lora"], TrainSetup(batch_size=2, seq_len=256, packed=True, **extra))


def test_packing_costs_the_mask_and_rope_tables():
    plain = estimate("tiny-llama-20m", METHODS["lora"], TrainSetup(batch_size=4, seq_len=256), device="cpu")
    packed = estimate("tiny-llama-20m", METHODS["lora"], TrainSetup(batch_size=4, seq_len=256, packed=True),
                      device="cpu")
    terms = packed.activation_terms
    assert terms["blocks: rotary tables"] == 4 * plain.activation_terms["blocks: rotary tables"]
    assert packed.peak_bytes > plain.peak_bytes and packed.options["packed"] is True
    assert "packed" not in plain.options  # default outputs unchanged


def test_packed_traced_family(tmp_path):
    from transformers import Qwen3Config

    Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=512).save_pretrained(tmp_path)
    _close(str(tmp_path), METHODS["lora"], TrainSetup(batch_size=2, seq_len=128, packed=True))


def test_cli_flag(capsys):
    assert main(["tiny-llama-20m", "--method", "lora", "--packed", "--json"]) == 0
    assert '"packed": true' in capsys.readouterr().out
