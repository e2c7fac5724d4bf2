"""LoRA on tiny Llama models: unchanged at init, only adapters train, exact merge, PEFT both ways."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from estimator.config import LoRAConfig
from lowrank.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from tests.helpers import train_losses

VOCAB = 128


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """B is zero at init, which would make every comparison trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_output_equals_base_at_init(base, ids):
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets="all-linear"))
    assert len(lora_layers(model)) == 2 * 7
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)


def test_layer_structure_and_init():
    base_layer = nn.Linear(64, 32, dtype=torch.bfloat16)
    layer = LoRALinear(base_layer, rank=4, alpha=8)
    assert layer.base_layer is base_layer and not base_layer.weight.requires_grad  # W is frozen
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (32, 4)
    assert layer.lora_A.bias is None and layer.lora_B.bias is None
    assert layer.lora_A.weight.dtype == torch.bfloat16  # the base weight's dtype by default
    assert isinstance(layer.lora_dropout, nn.Identity)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.float().abs().max() <= 1 / math.sqrt(64) + 1e-3  # Kaiming-uniform, a=√5
    assert layer.scaling == 2.0
    assert isinstance(LoRALinear(nn.Linear(64, 32), 4, 8, dropout=0.1).lora_dropout, nn.Dropout)
    assert LoRALinear(nn.Linear(64, 32), 4, 8, use_rslora=True).scaling == 4.0
    assert LoRALinear(base_layer, 4, 8, dtype=torch.float32).lora_A.weight.dtype == torch.float32


def test_only_adapters_train(base, ids):
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets="q_proj,v_proj")).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all of them: frozen ones get no grad
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if ".lora_B" in name:
            assert not torch.equal(p, before[name]), name
        elif ".lora_" not in name:
            assert torch.equal(p, before[name]), name


def test_merge_is_exact(base, ids):
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = logits(model, ids)
    assert not torch.allclose(unmerged, logits(base, ids))
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    merge_lora(model)  # guarded by the flag: merging twice changes nothing
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(weight, original["model.layers.0.self_attn.q_proj.base_layer.weight"])
    torch.testing.assert_close(logits(model, ids), unmerged)
    unmerge_lora(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, original[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged)


@pytest.mark.parametrize("targets", ["attention", "mlp", "all-linear", "q_proj,v_proj"])
def test_peft_loads_our_adapter(base, ids, tmp_path, targets):
    from peft import PeftModel

    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.05, targets=targets, use_rslora=targets == "mlp")
    model = apply_lora(copy.deepcopy(base), cfg).eval()
    randomize_adapters(model)
    save_adapter(model, cfg, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {"attention": ["k_proj", "o_proj", "q_proj", "v_proj"], "mlp": ["down_proj", "gate_proj", "up_proj"],
                "all-linear": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                "q_proj,v_proj": ["q_proj", "v_proj"]}[targets]
    assert config["target_modules"] == expected
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["base_model_name_or_path"] == "tiny-llama"
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids))


def test_we_load_a_peft_adapter(base, ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), peft_cfg)
    randomize_adapters(peft_model)
    peft_model.save_pretrained(tmp_path)
    expected = logits(peft_model, ids)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)  # LoRA layers created from the adapter
    assert sorted(p.rsplit(".", 1)[-1] for p in lora_layers(loaded)) == ["down_proj"] * 2 + ["q_proj"] * 2
    torch.testing.assert_close(logits(loaded, ids), expected)
    # into a model that already has LoRA on the same layers (scaling comes from the adapter)
    ours = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=99, targets="q_proj,down_proj"))
    torch.testing.assert_close(logits(load_adapter(ours, tmp_path), ids), expected)


def test_ambiguous_names_are_saved_as_paths(base, ids, tmp_path):
    from peft import PeftModel

    cfg = LoRAConfig(rank=4, alpha=8, targets="q_proj")
    model = apply_lora(copy.deepcopy(base), cfg)
    randomize_adapters(model)
    attn = model.model.layers[1].self_attn
    attn.q_proj = attn.q_proj.base_layer  # "q_proj" alone would now select a layer without LoRA
    save_adapter(model, cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids))
    torch.testing.assert_close(logits(load_adapter(copy.deepcopy(base), tmp_path), ids), logits(model, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_goes_down(ids, dtype):
    torch.manual_seed(0)
    model = apply_lora(tiny_llama(dtype), LoRAConfig(rank=8, alpha=16, dropout=0.1, targets="all-linear")).train()
    assert {p.dtype for p in lora_parameters(model)} == {dtype}
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = train_losses(model, optimizer, ids, steps=50)
    assert losses[-1] < 0.85 * losses[0], losses


def test_bad_inputs(base):
    with pytest.raises(ValueError, match=r"rank=48 exceeds the smallest dimension of model\.layers\.0\.self_attn\.k_proj"):
        apply_lora(copy.deepcopy(base), LoRAConfig(rank=48, targets="attention"))
    with pytest.raises(ValueError, match="no linear layer named qq_proj"):
        apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets="q_proj,qq_proj"))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(copy.deepcopy(base), LoRAConfig(rank=4)), LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="rank=0"):
        LoRALinear(nn.Linear(8, 8), rank=0, alpha=1)


def test_bad_adapters(base, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json does not exist"):
        load_adapter(copy.deepcopy(base), tmp_path)
    cfg = LoRAConfig(rank=4, targets="q_proj")
    model = apply_lora(copy.deepcopy(base), cfg)
    with pytest.raises(ValueError, match="does not describe the layers"):
        save_adapter(model, LoRAConfig(rank=8, targets="q_proj"), tmp_path)
    save_adapter(model, cfg, tmp_path)
    with pytest.raises(ValueError, match=r"shape \(4, 64\), the model \(2, 64\); build the model with rank=4"):
        load_adapter(apply_lora(copy.deepcopy(base), LoRAConfig(rank=2, targets="q_proj")), tmp_path)
    with pytest.raises(ValueError, match="LoRA on"):
        load_adapter(apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, targets="v_proj")), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(copy.deepcopy(base), tmp_path)
