"""ModelSpec: exact shapes for every architecture, from any source a user has."""

from __future__ import annotations

import json

import pytest
import torch

from estimator.spec import load_spec, preset_names, spec_from_config
from estimator.targets import is_linear, linear_shape
from tests.helpers import TINY, tiny_config, tiny_model

ARCHITECTURES = list(TINY)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_parameter_counts_match_a_real_model(model_type):
    model = tiny_model(model_type)
    spec = spec_from_config(model.config, model_type)
    assert spec.params_total == sum(p.numel() for p in model.parameters())
    assert spec.family in ("llama", "gemma", "gpt2", "gpt_neox") and spec.exact_family


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_linear_shapes_match_the_modules(model_type):
    model = tiny_model(model_type)
    spec = spec_from_config(model.config, model_type)
    real = {}
    for name, module in model.named_modules():
        if is_linear(module) and name != "lm_head":
            key = (name.rsplit(".", 1)[-1], *linear_shape(module), module.bias is not None)
            real[key] = real.get(key, 0) + 1
    assert {(lin.short, lin.in_features, lin.out_features, lin.bias): lin.count for lin in spec.linears} == real


def test_grouped_query_attention_shapes():
    spec = spec_from_config(tiny_config("llama"), "gqa")
    shapes = {lin.short: (lin.in_features, lin.out_features) for lin in spec.linears}
    assert shapes["q_proj"] == (64, 64) and shapes["k_proj"] == (64, 32) and shapes["v_proj"] == (64, 32)
    assert spec.num_kv_heads == 2 and spec.kv_dim == 32


def test_tied_embeddings_and_biases():
    qwen = spec_from_config(tiny_config("qwen2"), "qwen")
    assert qwen.tie_word_embeddings and qwen.lm_head_params == 0
    assert {lin.short for lin in qwen.linears if lin.bias} == {"q_proj", "k_proj", "v_proj"}
    llama = spec_from_config(tiny_config("llama"), "llama")
    assert not llama.tie_word_embeddings and llama.lm_head_params == 256 * 64


@pytest.mark.parametrize("name,billions", [("llama-7b", 6.738), ("llama2-70b", 68.977), ("llama3.1-8b", 8.030),
                                           ("mistral-7b", 7.242), ("qwen2.5-0.5b", 0.494), ("gemma-7b", 8.538),
                                           ("gpt2", 0.124), ("llama-60m", 0.058), ("tiny-llama-20m", 0.020)])
def test_presets_have_their_published_sizes(name, billions):
    assert load_spec(name).params_total / 1e9 == pytest.approx(billions, abs=0.001)


def test_every_preset_loads():
    for name in preset_names():
        assert load_spec(name).num_layers > 0


def test_config_file_and_model_folder(tmp_path):
    model = tiny_model("mistral")
    model.save_pretrained(tmp_path / "folder")
    from_folder = load_spec(str(tmp_path / "folder"))
    from_file = load_spec(str(tmp_path / "folder" / "config.json"))
    assert from_folder.params_total == from_file.params_total == sum(p.numel() for p in model.parameters())
    assert from_folder.name == "folder"


def test_edited_config_file_is_read_again(tmp_path):
    path = tmp_path / "config.json"
    data = {"model_type": "llama", **TINY["llama"]}
    path.write_text(json.dumps(data))
    first = load_spec(str(path)).params_total
    path.write_text(json.dumps({**data, "num_hidden_layers": 3}))
    import os
    os.utime(path, ns=(1, 10**18))  # a new modification time even on coarse clocks
    assert load_spec(str(path)).params_total > first


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"hidden_size": 64}', "no \"model_type\""),
    ('{"model_type": "no-such-arch"}', "not a transformers architecture"),
])
def test_bad_config_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_spec(str(path))


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean llama-7b"):
        load_spec("llama7b")


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    for path in (str(tmp_path / "nope"), "./no/such/model", "~/missing-model"):
        with pytest.raises(ValueError, match="no such file or folder"):
            load_spec(path)


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_spec(str(tmp_path))


def test_offline_hub_id_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot be reached"):
        load_spec("some-org/some-model-that-is-not-cached")


def test_meta_build_allocates_nothing():
    before = torch.empty(0).untyped_storage().nbytes()
    spec = load_spec("llama2-70b")
    assert spec.params_total > 6e10 and before == 0


@pytest.mark.parametrize("content, message", [
    ('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests deeper than 32 levels"),
    ('{"model_type": "llama", "x": ' + "[" * 40 + "]" * 40 + "}", "nests deeper than 32 levels"),
    ('{"model_type": "llama", "pad": "' + "x" * (1 << 20) + '"}', "larger than 1 MB"),
    ('{"model_type": "llama", "num_hidden_layers": 20000}', "num_hidden_layers=20000 must be a whole number from 1 "
                                                            "to 1,024"),
    ('{"model_type": "llama", "hidden_size": 1e9}', "hidden_size=1000000000.0 must be a whole number"),
    ('{"model_type": "llama", "vocab_size": true}', "vocab_size=True must be a whole number"),
    ('{"model_type": "llama", "num_attention_heads": 0}', "num_attention_heads=0 must be a whole number from 1"),
    ('{"model_type": "mixtral", "text_config": {"num_local_experts": 100000}}', "num_local_experts=100000"),
    ('{"model_type": "llama", "x": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"model_type": ["llama"]}', "model_type=['llama'] must be a string"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}', "transformers cannot read this llama"),
])
def test_hostile_config_files_fail_fast_with_one_line(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_spec(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_non_utf8_config_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_spec(str(path))


@pytest.mark.parametrize("source, message", [
    ("x" * 5000, "is 5,000 characters long; a preset name, path or hub id is at most 1,024"),
    ("/" + "x" * 300 + "/config.json", "cannot be used as a path (File name too long)"),
    ("a\x00b", "unknown preset"),
    (["llama-7b"], "must be a string"),
    ("   ", "model is empty"),
])
def test_model_names_the_os_or_python_cannot_take_are_clean_errors(source, message):
    with pytest.raises(ValueError) as err:
        load_spec(source)
    assert message in str(err.value)


def test_sizes_within_the_bounds_still_load(tmp_path):
    """The bounds are beyond any real model: a config at a few of them loads (built on the meta device)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **TINY["llama"], "vocab_size": 1 << 22,
                                "max_position_embeddings": 1 << 24}))
    assert load_spec(str(path)).vocab_size == 1 << 22


@pytest.mark.parametrize("module, cls, used, not_used", [
    ("jamba", "JambaForCausalLM", "dt_proj", "x_proj"),  # dt_proj.weight @ x
    ("hy_v4", "HYV4ForCausalLM", "weights_proj", "wq_b"),  # x.to(self.weights_proj.weight.dtype)
    ("falcon", "FalconForCausalLM", None, "query_key_value"),  # a float dtype for flash attention only
])
def test_linears_the_family_code_uses_directly(module, cls, used, not_used):
    """Linears whose weight the model's code multiplies, or whose dtype it casts its input to, stay
    plain parameters: a 4-bit or INT8 layer in their place would break the model."""
    import importlib

    from estimator.targets import weights_used_directly

    found = weights_used_directly(getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls))
    assert used is None or used in found
    assert not_used not in found
