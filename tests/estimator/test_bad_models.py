"""Models the package cannot train as given: one line naming the problem and the fix, exit status 2,
nothing started; and families without SDPA, which run (and are estimated with) eager attention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimator import cli
from estimator.config import FullConfig, TrainSetup
from estimator.estimate import estimate, estimate_spec
from estimator.spec import (
    architecture_problem,
    attention_fallback,
    load_config,
    load_spec,
    spec_from_config,
    token_id_problem,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000)


def save(root: Path, name: str, model_type: str, **values) -> str:
    from transformers import AutoConfig

    folder = root / name
    AutoConfig.for_model(model_type, **values).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        # phi3's defaults keep pad_token_id=32000 and eos_token_id=32000 (not even written to the file)
        "phi3": save(root, "phi3", "phi3", **SMALL),
        "gemma2": save(root, "gemma2", "gemma2", **SMALL, head_dim=16),
        "bert": save(root, "bert", "bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, vocab_size=1000),
        "t5": save(root, "t5", "t5", d_model=64, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000),
        "whisper": save(root, "whisper", "whisper", d_model=64, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=1000),
        "clip": save(root, "clip", "clip"),
    }


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


# --- special token ids outside the vocabulary --------------------------------------------------

def test_token_ids_outside_the_vocabulary_are_named_with_the_fix():
    problem = token_id_problem({"vocab_size": 1000, "pad_token_id": 32000, "bos_token_id": 1,
                                "eos_token_id": [2, 32000]})
    assert problem == ("pad_token_id=32000, eos_token_id=[2, 32000] are outside the vocabulary (vocab_size=1000); "
                       "set pad_token_id and eos_token_id below vocab_size=1000, or null")


def test_nested_text_config_and_a_multimodal_top_level_are_checked():
    problem = token_id_problem({"text_config": {"vocab_size": 10, "bos_token_id": 10}, "pad_token_id": 12})
    assert "text_config.bos_token_id=10" in problem and "pad_token_id=12" in problem
    assert "vocab_size=10" in problem and "or null" in problem


@pytest.mark.parametrize("value", [None, 0, 999, -1, -1000])
def test_ids_torch_accepts_pass(value):
    """-1 is stored by several hub configs; torch's Embedding takes -vocab_size <= padding_idx < vocab_size."""
    assert token_id_problem({"vocab_size": 1000, "pad_token_id": value, "eos_token_id": [value, 0]}) is None


def test_every_source_is_checked(models, tmp_path):
    folder = models["phi3"]
    with pytest.raises(ValueError, match=r"pad_token_id=32000.*vocab_size=1000.*set pad_token_id .*below vocab_size=1000, or null"):
        load_config(folder)  # a folder
    with pytest.raises(ValueError, match="pad_token_id=32000"):
        load_config(str(Path(folder) / "config.json"))  # a file
    with pytest.raises(ValueError, match="pad_token_id=32000"):
        load_spec(folder)  # the estimator and the app
    data = json.loads((Path(folder) / "config.json").read_text())
    fixed = tmp_path / "config.json"
    fixed.write_text(json.dumps({**data, "pad_token_id": None, "eos_token_id": 2}))
    assert load_spec(str(fixed)).vocab_size == 1000


@pytest.mark.parametrize("argv", [
    ("estimator", "{model}", "--method", "full"),
    ("lowrank.train", "--model", "{model}", "--method", "full", "--dry-run"),
])
def test_both_clis_refuse_in_one_line_with_status_2(models, argv):
    result = run_cli(*(a.format(model=models["phi3"]) for a in argv))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no transformers warning, no traceback
    assert "pad_token_id=32000" in lines[0] and "or null" in lines[0] and "Padding_idx" not in lines[0]
    assert result.stdout == ""


# --- architectures that are not decoder-only causal LMs ------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("bert", "bert is an encoder"),
    ("t5", "t5 is an encoder-decoder model"),
    ("whisper", "whisper is an encoder-decoder model"),
    ("clip", "clip has no causal language model class"),
])
def test_architectures_that_are_not_decoders_are_refused(models, name, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([models[name], "--method", "full"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and words in err
    assert "decoder-only causal LM; use a decoder-only model such as llama" in err
    assert "Unrecognized configuration class" not in err


def test_the_dry_run_refuses_an_encoder_decoder_in_one_line(models):
    result = run_cli("lowrank.train", "--model", models["t5"], "--method", "full", "--dry-run")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "t5 is an encoder-decoder model" in result.stderr


def test_decoders_pass_and_an_encoder_made_causal_passes():
    from transformers import AutoConfig

    for model_type in ("llama", "gpt2", "gpt_neox", "gemma2"):
        assert architecture_problem(AutoConfig.for_model(model_type)) is None, model_type
    bert = AutoConfig.for_model("bert", is_decoder=True)
    assert architecture_problem(bert) is None
    assert "is_decoder" in architecture_problem(AutoConfig.for_model("bert"))


# --- attention implementations ---------------------------------------------------------------------

def test_a_family_without_sdpa_falls_back_to_eager(models):
    config = load_config(models["gemma2"])
    note = "gemma2 does not support sdpa attention; eager attention is used"
    assert attention_fallback(config, "sdpa") == ("eager", note)
    assert attention_fallback(config, "eager") == ("eager", None)
    spec = load_spec(models["gemma2"])
    assert attention_fallback(spec, "sdpa") == ("eager", note)  # a ModelSpec answers the same
    assert attention_fallback(spec.config, "sdpa") == ("eager", note)  # and its config dict
    assert attention_fallback({"model_type": "llama"}, "sdpa") == ("sdpa", None)


def test_an_implementation_the_family_cannot_run_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"^attn_implementation=flex_attention is not supported by gpt2; "
                                         r"use one of sdpa, eager$"):
        attention_fallback({"model_type": "gpt2"}, "flex_attention")
    # hub code decides for itself
    remote = {"model_type": "gemma2", "auto_map": {"AutoModelForCausalLM": "x.Y"}}
    assert attention_fallback(remote, "sdpa") == ("sdpa", None)


def test_the_estimate_describes_eager_attention_with_a_note(models):
    spec = load_spec(models["gemma2"])
    setup = TrainSetup(batch_size=2, seq_len=64, attn_implementation="sdpa")
    est = estimate_spec(spec, FullConfig(), setup, device="cpu")
    eager = estimate_spec(spec, FullConfig(), TrainSetup(batch_size=2, seq_len=64, attn_implementation="eager"),
                          device="cpu")
    assert est.options["attn_implementation"] == "eager" and est.describe().endswith("eager")
    assert "gemma2 does not support sdpa attention; eager attention is used" in est.notes
    assert est.peak_bytes == eager.peak_bytes and est.moments == eager.moments
    assert not any("sdpa" in n for n in eager.notes)
    # a family with SDPA keeps it
    from tests.helpers import tiny_config

    llama = estimate_spec(spec_from_config(tiny_config("llama"), "llama"), FullConfig(), setup, device="cpu")
    assert llama.options["attn_implementation"] == "sdpa" and not any("sdpa" in n for n in llama.notes)


def test_the_dry_run_of_a_family_without_sdpa_runs(models):
    from lowrank.dryrun import dry_run

    setup = TrainSetup(batch_size=1, seq_len=32)
    measured = dry_run(models["gemma2"], FullConfig(), setup, device="cpu")
    predicted = estimate(models["gemma2"], FullConfig(), setup, device="cpu")
    assert measured.peak_bytes > 0
    assert abs(predicted.peak_bytes - measured.peak_bytes) < 0.25 * measured.peak_bytes
