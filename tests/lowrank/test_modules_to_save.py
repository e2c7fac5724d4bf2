"""LoRA's modules_to_save (trainable copies of the embeddings / lm_head, peft's way) and LoRA on lm_head:
only the chosen modules and the adapters change, the adapter file round-trips with peft 0.21, merges."""

from __future__ import annotations

import warnings

import pytest
import torch

from estimator.config import LoRAConfig, QLoRAConfig
from lowrank.lora import (
    ModulesToSave,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
    saved_modules,
)
from tests.helpers import tiny_model


def _train(model, steps: int = 3, vocab: int = 256) -> None:
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _changed(before: dict, model) -> set[str]:
    after = dict(model.named_parameters())
    return {name for name, p in after.items() if name in before and not torch.equal(before[name], p.detach())}


def test_config_spellings_and_refusals():
    assert LoRAConfig(modules_to_save="lm_head, embeddings").modules_to_save == "embed_tokens,lm_head"
    assert LoRAConfig(modules_to_save="wte").modules_to_save == "embed_tokens"
    assert LoRAConfig(modules_to_save="embed_in,embed_out").saved_modules == ("embed_tokens", "lm_head")
    assert QLoRAConfig(modules_to_save="lm_head").saved_modules == ("lm_head",)
    with pytest.raises(ValueError, match="not one of"):
        LoRAConfig(modules_to_save="norm")
    with pytest.raises(ValueError, match="both in targets and in modules_to_save"):
        LoRAConfig(targets="q_proj,lm_head", modules_to_save="lm_head")
    cfg = LoRAConfig(targets="q_proj,lm_head")
    assert cfg.head_lora and cfg.block_targets == "q_proj"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_only_chosen_modules_and_adapters_train(family):
    model = tiny_model(family)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    apply_lora(model, LoRAConfig(rank=4, targets="all-linear", modules_to_save="embeddings,lm_head"))
    assert len(saved_modules(model)) == 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    changed = _changed(before, model)
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n} | \
        {n for n in changed if "lora_A" in n}  # lora_A moves from the 2nd step on (B starts at zero)
    assert all("lora_" in n or ".modules_to_save.default." in n for n in changed)
    assert sum(".modules_to_save.default." in n for n in changed) == 2
    assert not any(".original_module." in n for n in changed)  # the originals stay frozen (tied ones too)
    if tied:  # the copies are the modules' own: untied, as peft's
        assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight


def test_peft_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    cfg = LoRAConfig(rank=4, targets="q_proj,v_proj,lm_head", modules_to_save="embed_tokens")
    apply_lora(model, cfg)
    _train(model)
    save_adapter(model, cfg, tmp_path / "ours")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours")
        with torch.no_grad():
            theirs = theirs_model(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours)
        # theirs into ours: peft's file (with lm_head.base_layer.weight and the copies' keys)
        theirs_model.save_pretrained(tmp_path / "theirs")
    back = load_adapter(tiny_model("llama"), tmp_path / "theirs")
    assert isinstance(back.get_input_embeddings(), ModulesToSave) and "lm_head" in lora_layers(back)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours)


def test_peft_modules_to_save_lm_head_into_ours(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"],
                                                           fan_in_fan_out=True))
        with torch.no_grad():
            theirs.base_model.model.lm_head.modules_to_save.default.weight.add_(0.01)
            for n, p in theirs.named_parameters():
                if "lora_B" in n:
                    p.add_(0.01)
        theirs.save_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = theirs.eval()(input_ids=ids).logits  # GPT-2 drops out in train mode
    ours = load_adapter(tiny_model("gpt2"), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, want)


def test_lm_head_lora_merges_and_tied_refused():
    model = tiny_model("llama")
    apply_lora(model, LoRAConfig(rank=4, targets="lm_head"))
    assert list(lora_layers(model)) == ["lm_head"]
    with torch.no_grad():
        model.lm_head.lora_B.weight.normal_()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
    tied = apply_lora(tiny_model("qwen2"), LoRAConfig(rank=4, targets="lm_head"))
    with pytest.raises(ValueError, match="tied"):
        merge_lora(tied)


def test_qlora_keeps_lm_head_and_copies_unquantized():
    from bitsandbytes.nn import Linear4bit

    from lowrank.qlora import apply_qlora

    model = apply_qlora(tiny_model("llama").to(torch.bfloat16),
                        QLoRAConfig(rank=4, targets="q_proj,lm_head", modules_to_save="embed_tokens"))
    assert not isinstance(model.lm_head.base_layer, Linear4bit)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    _train(model, steps=2)
    assert all("lora_" in n or ".modules_to_save.default." in n for n in _changed(before, model))
