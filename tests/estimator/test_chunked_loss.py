"""The estimator's chunked loss (`--loss chunked`, estimator/loss.py) against the dry run of the
real step (lowrank/loss.py on fake tensors): the peak within 1% and every category holding ≥10%
of the peak within 5%; the saving at a 128k vocabulary; the options in both CLIs and JSON."""

from __future__ import annotations

import json

import pytest

from estimator.cli import main
from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate
from lowrank.dryrun import dry_run

pytestmark = pytest.mark.filterwarnings("ignore")

METHODS = {
    "full": FullConfig(),
    "lora": LoRAConfig(rank=16),
    "qlora": QLoRAConfig(rank=16),
    "galore-layerwise": GaLoreConfig(rank=64, optimizer="adamw8bit", layerwise=True),
    "qgalore": QGaLoreConfig(rank=64),
}
LLAMA_128K = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 256, "intermediate_size": 688,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096}


def compare(model: str, method, setup: TrainSetup) -> tuple:
    """(estimate, dry run) of one step on CPU, after checking the targets."""
    predicted = estimate(model, method, setup, device="cpu")
    measured = dry_run(model, method, setup, device="cpu")
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01), (predicted.moment, measured.phase)
    for category, value in measured.breakdown.items():
        if value >= 0.1 * measured.peak_bytes:
            assert predicted.breakdown[category] == pytest.approx(value, rel=0.05), category
    return predicted, measured


@pytest.mark.parametrize("name, setting", [(name, dict(batch_size=4, seq_len=128)) for name in METHODS] +
                         [(name, dict(batch_size=1, seq_len=64, grad_accum=2)) for name in ("full", "galore-layerwise")],
                         ids=[f"{name}-4x128" for name in METHODS] + ["full-accum-2", "galore-layerwise-accum-2"])
def test_the_estimate_meets_the_dry_run_on_tiny_llama(name, setting):
    compare("tiny-llama-20m", METHODS[name], TrainSetup(loss="chunked", **setting))


@pytest.fixture(scope="module")
def llama_128k(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama-128k") / "config.json"
    path.write_text(json.dumps(LLAMA_128K))
    return str(path)


@pytest.mark.parametrize("method", [LoRAConfig(rank=16), FullConfig()], ids=["lora", "full"])
def test_at_a_128k_vocabulary_the_chunked_loss_saves_the_logits(llama_128k, method):
    """Batch 1 × 2048: the full loss's logits (bf16 and fp32 copies, the log-softmax, its gradients)
    are the largest terms; the chunked loss keeps one chunk of them, predicted as measured."""
    full, _ = compare(llama_128k, method, TrainSetup(batch_size=1, seq_len=2048))
    chunked, _ = compare(llama_128k, method, TrainSetup(batch_size=1, seq_len=2048, loss="chunked"))
    assert chunked.peak_bytes < 0.5 * full.peak_bytes
    assert "log-softmax" not in str(chunked.activation_terms) and chunked.activation_terms["head: log-sum-exp"] == 2048 * 4


def test_checkpointing_and_autocast(llama_128k):
    compare("tiny-llama-20m", FullConfig(), TrainSetup(batch_size=2, seq_len=512, grad_checkpointing=True, loss="chunked"))
    compare(llama_128k, FullConfig(), TrainSetup(batch_size=2, seq_len=64, dtype="fp32", autocast=True, grad_accum=2,
                                                 loss="chunked", loss_chunk_tokens=48))


def test_a_soft_capped_family_traced_and_sharded_with_fsdp(tmp_path, llama_128k):
    """Gemma 2's soft-cap adds its derivative to a chunk's backward; FSDP2 gathers lm_head for the
    chunks and reduce-scatters its gradient (rank 0 of 2 on the fake process group)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gemma2", "vocab_size": 32000, "hidden_size": 128,
                                "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "head_dim": 32, "final_logit_softcapping": 30.0}))
    compare(str(path), FullConfig(), TrainSetup(batch_size=2, seq_len=64, loss="chunked", loss_chunk_tokens=128))
    compare(llama_128k, FullConfig(), TrainSetup(batch_size=4, seq_len=64, gpus=2, shard="full", loss="chunked",
                                                 loss_chunk_tokens=128))


def test_the_options_on_the_command_line_and_in_json(capsys):
    assert main(["tiny-llama-20m", "--method", "lora", "--loss", "chunked", "--loss-chunk-tokens", "64",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["options"]["loss"] == "chunked" and out["options"]["loss_chunk_tokens"] == 64
    assert "head: log-sum-exp" in out["activation_terms"]
    assert main(["tiny-llama-20m", "--method", "lora", "--json"]) == 0  # the default keeps its old JSON
    assert "loss" not in json.loads(capsys.readouterr().out)["options"]
    assert main(["tiny-llama-20m", "--method", "lora", "--loss", "chunked"]) == 0
    assert "chunked loss (256 tokens)" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("args, words", [(["--loss", "partial"], "invalid choice: 'partial'"),
                                         (["--loss", "chunked", "--loss-chunk-tokens", "0"], "--loss-chunk-tokens 0")])
def test_bad_values_exit_2_in_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tiny-llama-20m", "--method", "full", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and words in err


def test_a_head_the_chunked_loss_cannot_redo_is_refused(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "minicpm3", "vocab_size": 64, "hidden_size": 32,
                                "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                                "num_key_value_heads": 4, "bos_token_id": None, "eos_token_id": None}))
    assert main([str(path), "--method", "full"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--method", "full", "--loss", "chunked"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "use --loss full" in err
