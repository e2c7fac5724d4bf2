"""GPT-2's Conv1D (weight stored (in, out)) as a target of LoRA, QLoRA, GaLore and Q-GaLore.

Each method is checked against the nn.Linear twin of the same model (every Conv1D replaced by an
nn.Linear holding the transposed weight): same outputs, same updates, same adapters.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from estimator.config import GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from tests.helpers import train_losses

VOCAB = 64
CONV1D_PER_LAYER = 4  # attn.c_attn (fused q, k, v), attn.c_proj, mlp.c_fc, mlp.c_proj


def gpt2_config(**overrides):
    kwargs = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return AutoConfig.for_model("gpt2", **{**kwargs, **overrides})


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(gpt2_config())


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Conv1D replaced by the nn.Linear computing the same function."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def conv1d_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Conv1D/Linear-twin weight of the blocks as (out, in), by module path."""
    return {name: (m.weight.T if isinstance(m, Conv1D) else m.weight).detach().clone()
            for name, m in model.named_modules() if isinstance(m, (Conv1D, nn.Linear)) and ".h." in name}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(ids, use_cache=False).logits.float()


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    from lowrank.lora import lora_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


# ---------------------------------------------------------------------------------- LoRA
def test_lora_wraps_every_conv1d_and_trains(base, ids):
    from lowrank.lora import apply_lora, lora_layers, lora_parameters

    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, targets="all-linear")).train()
    layers = lora_layers(model)
    assert len(layers) == 2 * CONV1D_PER_LAYER
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert c_attn.fan_in_fan_out and isinstance(c_attn.base_layer, Conv1D)
    assert c_attn.lora_A.weight.shape == (4, 32) and c_attn.lora_B.weight.shape == (3 * 32, 4)  # (r, in), (out, r)
    assert all(p.requires_grad == ("lora_" in name) for name, p in model.named_parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_losses(model, torch.optim.AdamW(lora_parameters(model), lr=1e-2), ids, steps=3)
    assert losses[-1] < losses[0], losses
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == ("lora_" in name), name  # the adapters moved, nothing else did


def test_lora_equals_lora_on_the_linear_twin(base, ids):
    from lowrank.lora import apply_lora, lora_layers

    cfg = LoRAConfig(rank=4, alpha=8)
    model, twin = apply_lora(copy.deepcopy(base), cfg), apply_lora(linear_twin(base), cfg)
    randomize_adapters(model), randomize_adapters(twin)
    assert not any(layer.fan_in_fan_out for layer in lora_layers(twin).values())
    torch.testing.assert_close(logits(model, ids), logits(twin, ids))


def test_lora_merge_equals_the_unmerged_output(base, ids):
    from lowrank.lora import apply_lora, merge_lora, unmerge_lora

    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8))
    randomize_adapters(model)
    unmerged = logits(model, ids)
    assert (unmerged - logits(base, ids)).abs().max() > 1e-2  # the adapters do change the output
    merge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.transformer.h[1].attn.c_proj.base_layer.weight,  # square: a wrong
                               base.transformer.h[1].attn.c_proj.weight, rtol=0, atol=1e-6)  # transpose shows


def test_lora_adapter_round_trip_says_fan_in_fan_out(base, ids, tmp_path):
    from lowrank.lora import apply_lora, load_adapter, save_adapter

    cfg = LoRAConfig(rank=4, alpha=8, targets="attention")
    model = apply_lora(copy.deepcopy(base), cfg)
    randomize_adapters(model)
    save_adapter(model, cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    # a Llama-style adapter says fan_in_fan_out: false, and loading follows the layer type either way
    save_adapter(apply_lora(linear_twin(base), cfg), cfg, tmp_path / "twin")
    assert json.loads((tmp_path / "twin" / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_lora_adapter_loads_into_peft_and_back(base, ids, tmp_path):
    peft = pytest.importorskip("peft")
    from lowrank.lora import apply_lora, load_adapter, save_adapter

    cfg = LoRAConfig(rank=4, alpha=8)
    ours = apply_lora(copy.deepcopy(base), cfg)
    randomize_adapters(ours)
    save_adapter(ours, cfg, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert theirs.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)
    # peft's own adapter (fan_in_fan_out=True, as it asks for GPT-2) loads into ours
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- QLoRA
def test_qlora_quantizes_conv1d_transposed(base, ids, tmp_path):
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit

    from lowrank.lora import lora_layers, lora_parameters, save_adapter
    from lowrank.qlora import apply_qlora

    cfg = QLoRAConfig(rank=4, alpha=8, compute_dtype="fp32")
    model, twin = apply_qlora(copy.deepcopy(base), cfg), apply_qlora(linear_twin(base), cfg)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * CONV1D_PER_LAYER and all(m.from_conv1d for m in quantized)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    c_fc = model.transformer.h[0].mlp.c_fc.base_layer
    assert (c_fc.in_features, c_fc.out_features) == (32, 128)
    # the same 4-bit bytes as the Linear twin's, and the fp32 model's output up to NF4's error
    assert torch.equal(c_fc.weight, twin.transformer.h[0].mlp.c_fc.base_layer.weight)
    out, reference = logits(model, ids), logits(base, ids)
    torch.testing.assert_close(out, logits(twin, ids), rtol=0, atol=0)
    error = (out - reference).norm() / (reference - reference.mean()).norm()
    assert error < 0.12, error  # 0.07; with both square c_proj weights untransposed (fp32): 0.22
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):  # each (out, in) 4-bit weight is Wᵀ
        layer, conv = model.transformer.h[1].get_submodule(name).base_layer, base.transformer.h[1].get_submodule(name)
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert (dequantized - conv.weight.T).norm() < 0.3 * conv.weight.norm(), name  # NF4 of N(0, 0.02²): ~0.2
        if name == "attn.c_proj":  # square: W itself would fit, and be far off
            assert (dequantized - conv.weight).norm() > conv.weight.norm()
    model.train()
    losses = train_losses(model, torch.optim.AdamW(lora_parameters(model), lr=1e-2), ids, steps=3)
    assert losses[-1] < losses[0], losses
    assert not lora_layers(model)["transformer.h.0.attn.c_attn"].fan_in_fan_out  # a Linear4bit base now ...
    save_adapter(model, cfg, tmp_path)  # ... but the model it adapts stores (in, out): peft must know
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True


# ---------------------------------------------------------------------------------- GaLore
@pytest.mark.parametrize("shape, proj_type", [((16, 48), "std"), ((48, 16), "std"), ((24, 24), "std"),
                                              ((24, 24), "left"), ((16, 48), "right")])
def test_galore_on_conv1d_equals_galore_on_the_linear(shape, proj_type):
    """One Conv1D weight (in, out) and its nn.Linear (out, in): same loss, same updates."""
    from lowrank.galore import GaLoreAdamW

    in_features, out_features = shape
    torch.manual_seed(0)
    conv = Conv1D(out_features, in_features)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    group = dict(rank=4, update_proj_gap=2, scale=0.5, proj_type=proj_type, svd="randomized")
    opt_conv = GaLoreAdamW([{"params": [conv.weight], **group, "fan_in_fan_out": [True]},
                            {"params": [conv.bias]}], lr=1e-2, weight_decay=0.1)
    opt_linear = GaLoreAdamW([{"params": [linear.weight], **group}, {"params": [linear.bias]}],
                             lr=1e-2, weight_decay=0.1)
    assert opt_conv.projectors()[0].shape == opt_linear.projectors()[0].shape == (out_features, in_features)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # refreshes at steps 0 and 2
        x = torch.randn(8, in_features, generator=generator)
        target = torch.randn(8, out_features, generator=generator)
        for layer, optimizer in ((conv, opt_conv), (linear, opt_linear)):
            ((layer(x) - target) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.testing.assert_close(conv.weight.T, linear.weight, rtol=1e-5, atol=1e-6)
    assert opt_conv.grad_norm == pytest.approx(opt_linear.grad_norm, rel=1e-5)


@pytest.mark.parametrize("layerwise", [False, True])
def test_galore_trains_gpt2_as_its_linear_twin(base, ids, layerwise):
    from lowrank.galore import build_galore_optimizer, galore_param_groups

    # exact SVD: the twins' gradients differ in the last bits (Conv1D's addmm vs F.linear), and on
    # such a perturbation the randomized SVD of a refresh may flip the sign of a singular vector,
    # which the moments carried over from the previous subspace turn into another update (a
    # property of the SVD, nn.Linear models alone included, not of the transposition)
    cfg = GaLoreConfig(rank=4, update_proj_gap=2, scale=1.0, layerwise=layerwise, svd="exact")
    model, twin = copy.deepcopy(base).train(), linear_twin(base).train()
    group = galore_param_groups(model, cfg)[0]
    assert group["fan_in_fan_out"] == [True] * len(group["params"]) == [True] * 2 * CONV1D_PER_LAYER
    assert "fan_in_fan_out" not in galore_param_groups(twin, cfg)[0]
    losses = train_losses(model, build_galore_optimizer(model, cfg, lr=1e-2), ids, steps=3)
    twin_losses = train_losses(twin, build_galore_optimizer(twin, cfg, lr=1e-2), ids, steps=3)
    assert losses[-1] < losses[0], losses
    assert losses == pytest.approx(twin_losses, rel=1e-5)
    trained, twin_trained = conv1d_weights(model), conv1d_weights(twin)
    for name, weight in trained.items():
        torch.testing.assert_close(weight, twin_trained[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- Q-GaLore
def test_int8_layer_of_a_conv1d_computes_its_dequantized_weight():
    from lowrank.qgalore import Int8Linear

    torch.manual_seed(0)
    conv = Conv1D(48, 16)
    with torch.no_grad():
        conv.bias.normal_()
    layer = Int8Linear.from_linear(conv, group_size=64)
    assert (layer.in_features, layer.out_features) == (16, 48) and layer.from_conv1d
    dequantized = Conv1D(48, 16)
    with torch.no_grad():
        dequantized.weight.copy_(layer.dequantize_weight().T)
        dequantized.bias.copy_(conv.bias)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dequantized(x))
        assert (layer.dequantize_weight().T - conv.weight).abs().max() < 0.01  # INT8 error only


def test_qgalore_trains_gpt2_and_saves_conv1d(base, ids, tmp_path):
    from lowrank.qgalore import build_qgalore_optimizer, int8_linears, quantize_model_weights, save

    cfg = QGaLoreConfig(rank=4, update_proj_gap=2, weight_group_size=64, proj_group_size=64, layerwise=True)
    model = quantize_model_weights(copy.deepcopy(base), cfg).train()
    twin = quantize_model_weights(linear_twin(base), cfg)
    layers, twin_layers = int8_linears(model), int8_linears(twin)
    assert len(layers) == 2 * CONV1D_PER_LAYER and all(layer.from_conv1d for _, layer in layers)
    for (_, layer), (_, twin_layer) in zip(layers, twin_layers):  # same codes as the Linear twin's
        assert torch.equal(layer.weight_codes, twin_layer.weight_codes) and not twin_layer.from_conv1d
    torch.testing.assert_close(logits(model, ids), logits(twin, ids))
    before = [layer.weight_codes.clone() for _, layer in layers]
    optimizer = build_qgalore_optimizer(model, cfg, lr=1e-2)
    losses = train_losses(model.train(), optimizer, ids, steps=3)
    assert losses[-1] < losses[0], losses
    assert all(not torch.equal(layer.weight_codes, old) for (_, layer), old in zip(layers, before))
    trained = logits(model, ids)
    save(model, cfg, tmp_path, base_name=None, final=True)  # dequantized back into Conv1D
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.transformer.h[0].mlp.c_fc.weight.shape == (32, 128)  # (in, out), as GPT-2 stores it
    torch.testing.assert_close(logits(reloaded, ids), trained, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- dry run
@pytest.mark.parametrize("method", [LoRAConfig(rank=8), QLoRAConfig(rank=8)], ids=lambda m: m.method)
def test_dry_run_of_gpt2_adapters_beside_the_estimate(tmp_path, method):
    from estimator.estimate import estimate
    from lowrank.dryrun import dry_run

    gpt2_config(n_embd=64, n_head=4, vocab_size=500, n_positions=64).save_pretrained(tmp_path)
    setup = TrainSetup(batch_size=2, seq_len=64)
    measured = dry_run(str(tmp_path), method, setup, device="cpu")
    predicted = estimate(str(tmp_path), method, setup, device="cpu")
    assert measured.breakdown["adapters"] == predicted.breakdown["adapters"] > 0
    assert measured.breakdown["weights"] == predicted.breakdown["weights"]
    assert abs(predicted.peak_bytes - measured.peak_bytes) < 0.01 * measured.peak_bytes


@pytest.mark.parametrize("targets, dropout", [("c_attn", 0.0), ("c_fc", 0.1), ("c_attn,c_proj", 0.0)])
@pytest.mark.parametrize("pdrop", [0.0, 0.1], ids=["flash", "math"])  # CPU SDPA's kernel follows attention dropout
def test_gpt2_partial_targets_keep_only_what_trains(tmp_path, targets, dropout, pdrop):
    """LoRA on some of GPT-2's Conv1Ds: a frozen one keeps no input, and the first block saves
    nothing before its first adapted layer (was +5.5% with c_attn alone on the 124M model)."""
    from estimator.estimate import estimate
    from lowrank.dryrun import dry_run

    gpt2_config(n_embd=64, n_head=4, n_layer=3, vocab_size=500, n_positions=64, resid_pdrop=pdrop,
                attn_pdrop=pdrop, embd_pdrop=pdrop).save_pretrained(tmp_path)
    method, setup = LoRAConfig(rank=8, targets=targets, dropout=dropout), TrainSetup(batch_size=2, seq_len=64)
    measured = dry_run(str(tmp_path), method, setup, device="cpu")
    predicted = estimate(str(tmp_path), method, setup, device="cpu")
    assert predicted.breakdown["activations"] == pytest.approx(measured.breakdown["activations"], rel=1e-3)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=1e-3)
