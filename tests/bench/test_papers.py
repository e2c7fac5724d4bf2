"""bench/papers.py: every paper number gets a finite estimate, the headline rows agree, and where we
disagree the documented reason holds (numbers and sources in the script).

Tolerance: 10% for the GaLore/Q-GaLore "G" tables. The papers round to 0.01 G (±4% on 0.12 G), count
nominal model sizes (130M is 134M, 350M is 368M here) and never define G; 10% covers that and nothing
bigger. Rows printed by the authors' scripts and the 7B estimates get the same 10%.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from bench.papers import CLAIMS, GALORE_1B_TABLE, GALORE_TABLE, GALORE_TABLE6, SIZES, build_rows
from estimator import memory as mem
from estimator.config import FullConfig, TrainSetup
from estimator.spec import load_spec

TOLERANCE = 10.0


@pytest.fixture(scope="module")
def rows():
    return build_rows()


@pytest.fixture(scope="module")
def by_key(rows):
    out = {}
    for row in rows:
        out.setdefault(row.key, []).append(row)
    return out


def one(by_key, key, table=None):
    (row,) = [r for r in by_key[key] if table in (None, r.table)]
    return row


def test_every_claim_has_a_row_with_finite_numbers(rows, by_key):
    assert set(by_key) == set(CLAIMS)
    for row in rows:
        assert math.isfinite(row.ours) and row.ours > 0, row.item
        assert row.ours_bytes > 0, row.item
        if row.paper is None:
            assert "not found" in row.source, row.item
            assert row.diff is None and row.diff_pct is None
        else:
            assert math.isfinite(row.diff) and math.isfinite(row.diff_pct), row.item
        if abs(row.diff_pct or 0) >= TOLERANCE and not row.limit:
            assert row.why, f"{row.item}: {row.diff_pct:+.1f}% needs a reason"
    items = [(row.table, row.item) for row in rows]
    assert len(items) == len(set(items))
    json.dumps([asdict(r) for r in rows])  # --json works


def test_galore_table6_full_rank_and_low_rank_agree(by_key):
    for size in SIZES:
        for method in ("full", "low-rank"):
            for quantity in ("weights", "optimizer", "total"):
                row = one(by_key, f"galore/{size}/{method}/{quantity}", GALORE_TABLE)
                assert abs(row.diff_pct) < TOLERANCE, row.item


def test_galore_lora_rows_follow_the_papers_own_accounting(by_key):
    # the paper's pre-training LoRA trains embeddings/lm_head and counts them twice (§C.2): its rule on
    # our shapes reproduces the table; the estimator's fine-tuning LoRA has far fewer optimizer states
    for size in SIZES:
        for quantity in ("weights", "optimizer", "total"):
            row = one(by_key, f"galore/{size}/lora/{quantity}")
            assert abs(row.paper_rule - row.paper) / row.paper * 100 < TOLERANCE, row.item
        assert one(by_key, f"galore/{size}/lora/optimizer").diff_pct < -15


def test_galore_optimizer_table_is_below_its_own_rule(by_key):
    # documented disagreement: ours is the paper's mr + 2nr rule plus AdamW on embeddings and lm_head,
    # and Table 6(b) is lower at every size; the weights (full-rank, BF16) agree
    for size in SIZES:
        assert one(by_key, f"galore/{size}/galore/optimizer").diff_pct > 15
        assert abs(one(by_key, f"galore/{size}/galore/weights", GALORE_TABLE).diff_pct) < TOLERANCE


def test_galore_1b_table_was_computed_for_the_repository_config(by_key):
    for quantity in ("weights", "optimizer"):
        repo = one(by_key, f"galore/1b/full/{quantity}", GALORE_TABLE)
        paper_shapes = one(by_key, f"galore/1b/full/{quantity}", GALORE_1B_TABLE)
        assert abs(repo.diff_pct) < 5
        assert paper_shapes.diff_pct > 25  # 32 layers (Table 5) instead of 24 (configs/llama_1b.json)


def test_galore_7b_headlines(by_key):
    for key in ("galore/7b/adam8bit/total", "galore/7b/galore8bit/total", "galore/7b/fig1/bf16/total",
                "galore/7b/fig1/adam8bit/total", "galore/7b/fig1/galore8bit/total",
                "galore/7b/fig1/adam8bit/optimizer", "galore/7b/intro/weights", "galore/7b/intro/states"):
        assert abs(one(by_key, key).diff_pct) < TOLERANCE, key
    assert abs(one(by_key, "galore/7b/fig1/adam8bit/gradients").diff_pct) < 5
    # §1's "2GB for activations" at 2048 tokens is far below what autograd saves: documented, not hidden
    assert one(by_key, "galore/7b/intro/activations").ours > 5 * 2


def test_fits_claims_hold(rows):
    limits = [r for r in rows if r.limit]
    assert {r.key for r in limits} == {"galore/7b/24gb", "qgalore/7b/16gb", "qlora/65b/48gb"}
    for row in limits:
        assert row.ours <= row.paper, row.item


def test_authors_measurements_agree(rows):
    measured = [r for r in rows if r.key.startswith("measured/")]
    assert len(measured) == 5
    for row in measured:
        assert abs(row.diff_pct) < TOLERANCE, row.item


def test_qgalore_table1_counts_int8_weights_and_galore_bf16_states(by_key):
    # the reason ours is lower: Q-GaLore's Table 1 = GaLore's weights halved + GaLore's 16-bit optimizer
    galore = GALORE_TABLE6["galore"]
    for size in ("350m", "1b"):
        j = SIZES.index(size)
        assert CLAIMS[f"qgalore/{size}/total"].value == pytest.approx(galore["weights"][j] / 2
                                                                      + galore["optimizer"][j], abs=0.005)
    for size in SIZES:
        assert one(by_key, f"qgalore/{size}/total").diff_pct < 0
    assert abs(one(by_key, "qgalore/7b/total").diff_pct) < TOLERANCE


def test_qgalore_finetuning_full_and_lora_agree_galore_column_is_weights_alone(by_key):
    for model, preset in (("llama3-8b", "llama3.1-8b"), ("gemma-7b", "gemma-7b"), ("mistral-7b", "mistral-7b")):
        assert abs(one(by_key, f"qgalore-ft/{model}/full").diff_pct) < 5
        assert abs(one(by_key, f"qgalore-ft/{model}/lora").diff_pct) < TOLERANCE
        weights = mem.weights_bytes(load_spec(preset), FullConfig(), TrainSetup(dtype="bf16")) / 1e9
        paper = CLAIMS[f"qgalore-ft/{model}/galore"].value
        assert abs(weights - paper) / paper < 0.05  # the paper's GaLore column is the BF16 weights alone
        assert one(by_key, f"qgalore-ft/{model}/galore").diff_pct > 50


def test_qlora_rows(by_key):
    bf16, mixed = sorted(by_key["qlora/65b/full16"], key=lambda r: r.ours)
    assert bf16.ours < 780 < mixed.ours  # 780 GB = 12 B/param: between pure BF16 (8) and fp32 master (16)
    for size in ("7b", "13b", "33b", "65b"):
        row = one(by_key, f"qlora-fig6/{size}/optimizer")
        assert abs(2 * row.ours - row.paper) / row.paper < 0.15  # QLoRA's states are 32-bit, ours BF16


def test_lora_gpt3_rows(by_key):
    lora = one(by_key, "lora/gpt3/lora")
    assert abs(lora.diff_pct) < 5
    assert abs(one(by_key, "lora/gpt3/checkpoint").diff_pct) < TOLERANCE
    full = one(by_key, "lora/gpt3/full")
    weights = 2 * 174.6  # GB of FP16 weights
    assert 3 * weights < full.paper < 4 * weights  # the paper counts weights + 2 Adam moments (+ activations)
    assert full.ours == pytest.approx(4 * weights, rel=0.01)  # ours adds an FP16 gradient of every weight
