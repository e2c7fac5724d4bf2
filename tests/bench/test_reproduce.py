"""bench/reproduce.py's building blocks on a tiny model for a few steps: every variant it trains
runs through `run` (the full benchmark takes half an hour; this catches a variant that cannot start)."""

from __future__ import annotations

import math

import pytest

from bench.reproduce import LoRAWithEmbeddings, factorize, new_model, run
from estimator.config import GaLoreConfig, LoRAConfig, QGaLoreConfig, TrainSetup
from estimator.spec import load_config
from lowrank.data import default_documents, load_data

SETUP = TrainSetup(batch_size=2, seq_len=32, dtype="fp32")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reproduce")
    text = folder / "corpus.txt"
    text.write_text("\n".join(default_documents()[:4]), encoding="utf-8")
    return str(text), folder / "cache"


def train(data_args, method, low_rank: bool = False):
    text, cache = data_args
    data = load_data(text, None, load_config("tiny-llama-5m").vocab_size, SETUP.seq_len, SETUP.batch_size, 0, cache)
    model = new_model("tiny-llama-5m", 0)
    if low_rank:
        factorize(model, 8)
    return run("test", model, method, SETUP, data, steps=3, lr=1e-3, eval_batches=1)


@pytest.mark.parametrize("method", [LoRAConfig(rank=8), LoRAWithEmbeddings(rank=8), GaLoreConfig(rank=8),
                                    QGaLoreConfig(rank=8)], ids=lambda m: type(m).__name__)
def test_every_pretraining_variant_trains_and_is_measured(data_args, method):
    result = train(data_args, method)
    assert math.isfinite(result.eval_loss) and result.peak_bytes > 0 and len(result.losses) == 3


def test_lora_with_embeddings_trains_more_than_a_and_b(data_args):
    plain = train(data_args, LoRAConfig(rank=8))
    wider = train(data_args, LoRAWithEmbeddings(rank=8))
    config = load_config("tiny-llama-5m")
    assert wider.trainable - plain.trainable >= 2 * config.vocab_size * config.hidden_size  # embeddings, lm_head


def test_low_rank_factorization_trains_fewer_parameters(data_args):
    from estimator.config import FullConfig

    full = new_model("tiny-llama-5m", 0)
    result = train(data_args, FullConfig(), low_rank=True)
    assert 0 < result.trainable < sum(p.numel() for p in full.parameters())
