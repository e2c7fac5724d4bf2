"""QLoRA on tiny Llama models: 4-bit decoder linears, nothing upcast, adapters in compute dtype."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from torch import nn

from estimator.config import LoRAConfig, QLoRAConfig
from lowrank.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from lowrank.qlora import apply_qlora, quantize_linears, quantized_weight_bytes
from tests.helpers import train_losses
from tests.lowrank.test_lora import VOCAB, logits, randomize_adapters, tiny_llama

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama(torch.bfloat16)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def test_layers_are_quantized_and_the_rest_untouched(base):
    cfg = QLoRAConfig(rank=4, targets="q_proj,v_proj", quant_type="fp4", double_quant=False, compute_dtype="fp32")
    model = apply_qlora(copy.deepcopy(base), cfg)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * LINEARS_PER_LAYER  # every decoder linear, not only the LoRA targets
    for layer in quantized:
        assert layer.weight.quant_type == "fp4" and layer.weight.quant_state.state2 is None
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
        assert layer.compute_dtype == torch.float32
    assert all(isinstance(m.base_layer, Linear4bit) for m in lora_layers(model).values())
    assert len(lora_layers(model)) == 4
    # embeddings, norms and lm_head: same modules, same dtype (no fp32 upcast), same values, frozen
    originals = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if "embed" in name or "norm" in name or "lm_head" in name:
            assert p.dtype == torch.bfloat16 and torch.equal(p, originals[name]) and not p.requires_grad, name
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding


@pytest.mark.parametrize("compute_dtype, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_adapters_trainable_in_compute_dtype(base, compute_dtype, dtype):
    model = apply_qlora(copy.deepcopy(base), QLoRAConfig(rank=4, compute_dtype=compute_dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * LINEARS_PER_LAYER
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert {p.dtype for p in trainable} == {dtype}


def test_output_equals_quantized_base_at_init(base, ids):
    cfg = QLoRAConfig(rank=4, dropout=0.1)
    quantized = quantize_linears(copy.deepcopy(base), cfg)
    model = apply_qlora(copy.deepcopy(base), cfg).eval()
    torch.testing.assert_close(logits(model, ids), logits(quantized, ids), rtol=0, atol=0)
    # and the 4-bit model stays close to the bf16 one
    error = (logits(quantized, ids).float() - logits(base, ids).float()).norm() / logits(base, ids).float().norm()
    assert error < 0.2


def test_only_adapters_change_and_loss_goes_down(base, ids):
    model = apply_qlora(copy.deepcopy(base), QLoRAConfig(rank=8, alpha=16, targets="all-linear")).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    codes = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen ones get no grad
    losses = train_losses(model, optimizer, ids, steps=50)
    assert losses[-1] < 0.85 * losses[0], losses
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (".lora_" not in name), name
    assert all(torch.equal(m.weight, codes[n]) for n, m in model.named_modules() if isinstance(m, Linear4bit))


def test_adapter_round_trip(base, ids, tmp_path):
    cfg = QLoRAConfig(rank=4, alpha=8, targets="attention")
    model = apply_qlora(copy.deepcopy(base), cfg).eval()
    randomize_adapters(model)
    expected = logits(model, ids)
    save_adapter(model, cfg, tmp_path)
    # onto a QLoRA model with its adapters, and onto a quantized model without any
    fresh = apply_qlora(copy.deepcopy(base), cfg).eval()
    torch.testing.assert_close(logits(load_adapter(fresh, tmp_path), ids), expected)
    plain = load_adapter(quantize_linears(copy.deepcopy(base), cfg), tmp_path).eval()
    assert {p.dtype for p in lora_parameters(plain)} == {torch.bfloat16}
    torch.testing.assert_close(logits(plain, ids), expected)


def test_lora_adapter_loads_onto_qlora_model(tmp_path, ids):
    cfg = LoRAConfig(rank=4, alpha=8, targets="mlp")
    full = apply_lora(tiny_llama(torch.float32), cfg).eval()
    randomize_adapters(full)
    save_adapter(full, cfg, tmp_path)
    model = load_adapter(apply_qlora(tiny_llama(torch.float32), QLoRAConfig(rank=4, targets="mlp",
                                                                            compute_dtype="fp32")), tmp_path)
    torch.testing.assert_close(lora_parameters(model), lora_parameters(full))


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_weight_bytes(base, double_quant):
    model = quantize_linears(copy.deepcopy(base), QLoRAConfig(double_quant=double_quant))
    expected = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            n = m.in_features * m.out_features
            blocks = math.ceil(n / 64)
            if double_quant:  # codes, 8-bit absmax, fp32 absmax per 256 blocks, 256-entry table, NF4 table, offset
                expected += n // 2 + blocks + 4 * math.ceil(blocks / 256) + 1024 + 64 + 4
            else:  # codes, fp32 absmax, NF4 table
                expected += n // 2 + 4 * blocks + 64
    assert quantized_weight_bytes(model) == expected


def test_quantized_weight_bytes_match_the_memory_tracker(base, ids):
    from bitsandbytes.nn import Params4bit

    from lowrank.memory import MemoryTracker

    model = apply_qlora(copy.deepcopy(base), QLoRAConfig(rank=4)).train()
    tracker = MemoryTracker()
    tracker.watch_model(model)
    with tracker:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    unquantized = sum(p.nbytes for n, p in model.named_parameters() if not isinstance(p, Params4bit) and ".lora_" not in n)
    unquantized += sum(b.nbytes for b in model.buffers())
    assert tracker.result().breakdown["weights"] - unquantized == quantized_weight_bytes(model)


def test_eval_forward_keeps_the_training_layout(base, ids):
    model = apply_qlora(copy.deepcopy(base), QLoRAConfig(rank=4))
    size = quantized_weight_bytes(model)
    train_logits = logits(model.train(), ids)
    eval_logits = logits(model.eval(), ids)
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=0)
    assert quantized_weight_bytes(model) == size


def test_bad_inputs(base):
    model = apply_qlora(copy.deepcopy(base), QLoRAConfig(rank=4, targets="q_proj"))
    with pytest.raises(ValueError, match="cannot merge LoRA into a quantized Linear4bit"):
        merge_lora(model)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        quantize_linears(model, QLoRAConfig())
    with pytest.raises(ValueError, match="already 4-bit"):
        quantize_linears(quantize_linears(copy.deepcopy(base), QLoRAConfig()), QLoRAConfig())
    with pytest.raises(ValueError, match="rank=48 exceeds"):
        apply_qlora(copy.deepcopy(base), QLoRAConfig(rank=48, targets="k_proj"))
    with pytest.raises(ValueError, match="no linear layer named nope"):
        apply_qlora(copy.deepcopy(base), QLoRAConfig(rank=4, targets="nope"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda(ids):
    model = apply_qlora(tiny_llama(torch.bfloat16).cuda(), QLoRAConfig(rank=8, alpha=16)).train()
    assert all(p.is_cuda for p in lora_parameters(model))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = ids.cuda()
    losses = train_losses(model, optimizer, ids, steps=20)
    assert losses[-1] < losses[0], losses
