"""Int8Linear (forward, backward, hooks, updates), model conversion, and the adaptive refresh gap."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoConfig, AutoModelForCausalLM

from estimator.config import QGaLoreConfig
from lowrank.projector import GaLoreProjector
from lowrank.qgalore import AdaptiveGap, Int8Linear, QuantizedStore, int8_linears, quantize_model_weights
from lowrank.quant import QuantizedMatrix


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=2, vocab_size=128)
    return AutoModelForCausalLM.from_config(cfg)


def int8_layer(bias: bool = True, dtype: torch.dtype = torch.float32) -> Int8Linear:
    torch.manual_seed(0)
    return Int8Linear.from_linear(nn.Linear(96, 40, bias=bias).to(dtype), group_size=64)


def reference_grads(layer: Int8Linear, x: torch.Tensor, grad_out: torch.Tensor):
    """Autograd through F.linear with the same dequantized weight."""
    w = layer.dequantize_weight(x.dtype).requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = F.linear(x, w, b)
    y.backward(grad_out)
    return y, x.grad, w.grad, None if b is None else b.grad


# ----------------------------------------------------------------------------- Int8Linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_float_linear(bias, dtype):
    layer = int8_layer(bias, dtype)
    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 40, dtype=dtype)
    y = layer(x)
    y.backward(grad_out)
    y_ref, gx_ref, gw_ref, gb_ref = reference_grads(layer, x, grad_out)
    atol = 1e-5 if dtype == torch.float32 else 5e-2
    assert y.dtype == dtype and torch.allclose(y, y_ref, atol=atol)
    assert torch.allclose(x.grad, gx_ref, atol=atol)
    assert layer.weight_grad.dtype == dtype and torch.allclose(layer.weight_grad, gw_ref, atol=atol)
    if bias:
        assert torch.allclose(layer.bias.grad, gb_ref, atol=atol)


def test_forward_saves_only_the_input():
    layer = int8_layer()
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(4, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert saved == [(4, 96)]  # never the (40, 96) dequantized weight


def test_weight_grad_accumulates_and_hooks_see_it():
    layer = int8_layer()
    x = torch.randn(4, 96, requires_grad=True)
    seen = []
    handle = layer.register_weight_grad_hook(lambda lay: seen.append(lay.weight_grad.clone()))
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert len(seen) == 2 and torch.allclose(seen[1], 2 * seen[0]) and torch.allclose(layer.weight_grad, seen[1])
    handle.remove()
    layer.weight_grad = None
    layer(x).sum().backward()
    assert len(seen) == 2 and torch.allclose(layer.weight_grad, seen[0])


def test_hook_may_update_the_weight_in_backward():
    """A layer-wise step inside the hook must not change this layer's grad_input."""
    layer = int8_layer()
    x = torch.randn(4, 96, requires_grad=True)
    _, gx_ref, _, _ = reference_grads(layer, x, torch.ones(4, 40))
    before = layer.weight_codes.clone()

    def step(lay: Int8Linear) -> None:
        update = -0.1 * lay.weight_grad
        lay.weight_grad = None  # the full gradient is gone before the update is applied
        lay.apply_update(update)

    layer.register_weight_grad_hook(step)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, gx_ref, atol=1e-5)
    assert layer.weight_grad is None and not torch.equal(layer.weight_codes, before)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_layer_used_twice_gets_its_hooks_once_with_both_uses(checkpointed):
    """A looped model (Dory) runs a layer twice per forward: the hooks run once, after the last
    use's backward, with the sum of both uses' gradients; a layer-wise update there leaves the
    input gradients exact (the earlier use's backward has already multiplied by the old weight)."""
    from torch.utils.checkpoint import checkpoint

    layer = Int8Linear.from_linear(nn.Linear(64, 64), group_size=64)
    x = torch.randn(4, 64, requires_grad=True)
    w = layer.dequantize_weight().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(torch.tanh(F.linear(x_ref, w, layer.bias)), w, layer.bias).sum().backward()

    def twice(inp):
        return layer(torch.tanh(layer(inp)))

    seen = []

    def step(lay: Int8Linear) -> None:
        seen.append(lay.weight_grad.clone())
        lay.weight_grad = None
        lay.apply_update(torch.full((64, 64), 0.5))

    layer.register_weight_grad_hook(step)
    out = checkpoint(twice, x, use_reentrant=False) if checkpointed else twice(x)
    out.sum().backward()
    assert len(seen) == 1 and torch.allclose(seen[0], w.grad, atol=1e-4)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    layer(x).sum().backward()  # the next step: one use, one hook call
    assert len(seen) == 2


def test_weight_grad_without_any_input_grad():
    layer = int8_layer(bias=False)
    layer(torch.randn(4, 96)).sum().backward()  # x needs no grad, no bias: the weight still gets one
    assert layer.weight_grad is not None and layer.weight_grad.shape == (40, 96)


def test_autocast_computes_in_bf16():
    layer = int8_layer()
    x = torch.randn(4, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert layer.weight_grad.dtype == torch.bfloat16 and layer.bias.grad.dtype == torch.float32


def test_apply_update_adds_the_update():
    layer = int8_layer()
    w = layer.dequantize_weight()
    codes = layer.weight_codes.clone()
    layer.apply_update(torch.zeros(40, 96))
    assert torch.equal(layer.weight_codes, codes)
    update = torch.randn(40, 96) * 0.01
    layer.apply_update(update, generator=torch.Generator().manual_seed(0))
    step = layer.weight_scales.float().max()
    assert (layer.dequantize_weight() - (w + update)).abs().max() <= step


def test_buffers_survive_dtype_casts_and_state_dict():
    layer = int8_layer()
    layer.to(torch.bfloat16)
    assert layer.weight_scales.dtype == layer.weight_offsets.dtype == torch.float16
    assert layer.weight_codes.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    state = layer.state_dict()
    assert set(state) == {"weight_codes", "weight_scales", "weight_offsets", "bias"}
    fresh = Int8Linear(96, 40, group_size=64, dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dequantize_weight(), layer.dequantize_weight())


def test_int8_linear_runs_on_fake_tensors():
    with FakeTensorMode():
        layer = Int8Linear.from_linear(nn.Linear(512, 256), 256)
        x = torch.randn(2, 8, 512, requires_grad=True)
        layer(x).sum().backward()
        layer.apply_update(torch.randn(256, 512))
        assert layer.weight_grad.shape == (256, 512) and x.grad.shape == x.shape


# ----------------------------------------------------------------------------- model conversion
def test_quantize_model_weights_replaces_targets_only():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    quantize_model_weights(model, QGaLoreConfig(rank=8, weight_group_size=64))
    layers = int8_linears(model)
    assert len(layers) == 2 * 7 and all(lay.group_size == 64 for _, lay in layers)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    with torch.no_grad():
        after = model(ids, use_cache=False).logits
    assert (after - before).abs().max() < 0.02 * before.abs().max()
    with pytest.raises(ValueError, match="already has Int8Linear"):
        quantize_model_weights(model, QGaLoreConfig(rank=8))


def test_quantize_model_weights_attention_only_and_gpt2():
    model = quantize_model_weights(tiny_llama(), QGaLoreConfig(rank=8, targets="attention"))
    assert sorted({name.rsplit(".", 1)[-1] for name, _ in int8_linears(model)}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                                                 bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        before = gpt2(ids, use_cache=False).logits
        quantize_model_weights(gpt2, QGaLoreConfig(rank=8, weight_group_size=64))
        after = gpt2(ids, use_cache=False).logits
    assert len(int8_linears(gpt2)) == 2 * 4  # Conv1D weights are (in, out): transposed on the way in
    assert (after - before).abs().max() < 0.02 * before.abs().max()


def test_training_with_int8_weights_lowers_the_loss():
    """Layer-wise Adam on the INT8 weights (in the backward hooks), AdamW on the rest."""
    model = quantize_model_weights(tiny_llama(), QGaLoreConfig(rank=8, weight_group_size=64))
    lr, betas, eps = 3e-3, (0.9, 0.999), 1e-8
    generator = torch.Generator().manual_seed(0)
    moments: dict[Int8Linear, list] = {}

    def adam_step(layer: Int8Linear) -> None:
        grad = layer.weight_grad.float()
        layer.weight_grad = None
        m, v, t = moments.get(layer, (torch.zeros_like(grad), torch.zeros_like(grad), 0))
        m.lerp_(grad, 1 - betas[0])
        v.lerp_(grad.square(), 1 - betas[1])
        t += 1
        moments[layer] = (m, v, t)
        step = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        layer.apply_update(-lr * step, generator)

    for _, layer in int8_linears(model):
        layer.register_weight_grad_hook(adam_step)
    others = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    codes = model.model.layers[0].mlp.up_proj.weight_codes.clone()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(50):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        others.step()
        others.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight_codes, codes)
    assert all(layer.weight_grad is None for _, layer in int8_linears(model))


# ----------------------------------------------------------------------------- AdaptiveGap
def orthonormal(m: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, r, generator=torch.Generator().manual_seed(seed)))[0]


def refresh(gap: AdaptiveGap, projection: torch.Tensor, step: int) -> float | None:
    return gap.record(projection, step)


def test_gap_doubles_after_queue_size_similar_refreshes_and_clears_queue():
    gap = AdaptiveGap(10, "left", cos_threshold=0.4, queue_size=3)
    p = orthonormal(32, 4, 0)
    step = 0
    for _ in range(4):  # the first SVD has nothing to compare with, then 3 similar ones
        refresh(gap, p, step)
        step += gap.gap
    assert gap.gap == 20 and len(gap.queue) == 0 and gap.svd_count == 4
    assert gap.similarities[0] is None and all(s == pytest.approx(1.0) for s in gap.similarities[1:])
    for _ in range(2):  # the cleared queue needs 3 new similarities before the next doubling
        refresh(gap, p, step)
        step += gap.gap
    assert gap.gap == 20
    refresh(gap, p, step)
    assert gap.gap == 40 and [r.gap for r in gap.history] == [10, 10, 10, 20, 20, 20, 40]


def test_sign_flips_count_as_the_same_subspace():
    gap = AdaptiveGap(5, "right", queue_size=2)
    p = orthonormal(32, 4, 0).T  # (r, n): rows are right singular vectors
    assert refresh(gap, p, 0) is None
    assert refresh(gap, -p, 5) == pytest.approx(1.0)
    assert refresh(gap, p, 10) == pytest.approx(1.0)
    assert gap.gap == 10


def test_dissimilar_subspaces_keep_the_gap():
    gap = AdaptiveGap(5, "left", cos_threshold=0.4, queue_size=2)
    basis = orthonormal(64, 64, 1)
    for i in range(6):  # each refresh's leading vector is orthogonal to the previous one
        refresh(gap, basis[:, i:i + 4], 5 * i)
    assert gap.gap == 5 and all(s == pytest.approx(0.0, abs=1e-5) for s in gap.similarities[1:])


def test_the_projector_keeps_the_schedule_staggered_and_non_adaptive_never_doubles():
    projector = GaLoreProjector((32, 8), 2, 10, offset=3)
    projector.on_refresh = gap = AdaptiveGap(10, "right", queue_size=1, adaptive=False)
    grad = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    refreshed = [step for step in range(30) if projector.due(step) and projector.refresh(grad, step)]
    assert refreshed == [0, 3, 13, 23]  # staggered: the second SVD at the offset, then every gap
    assert gap.gap == 10 and gap.svd_count == 4 and all(s == pytest.approx(1.0) for s in gap.similarities[1:])


def test_explicit_old_projection_and_state_dict():
    gap = AdaptiveGap(10, "left", queue_size=2)
    a, b = orthonormal(16, 2, 0), orthonormal(16, 2, 1)
    gap.record(a, 0)
    assert gap.record(a, 10, old=b) == pytest.approx(abs(float(a[:, 0] @ b[:, 0])), abs=1e-5)
    again = AdaptiveGap(10, "left", queue_size=2)
    again.load_state_dict(gap.state_dict())
    assert again.history == gap.history and list(again.queue) == list(gap.queue)
    assert again.gap == gap.gap and torch.equal(again.last_vector, gap.last_vector)
    with pytest.raises(ValueError, match="side='up'"):
        AdaptiveGap(10, "up")
    with pytest.raises(ValueError, match="gap=0"):
        AdaptiveGap(0)


def test_adaptive_gap_as_a_projector_callback():
    """Duck-typed GaLoreProjector.on_refresh(projector, event): sets the projector's gap."""
    projector = SimpleNamespace(gap=10)
    gap = AdaptiveGap(10, "right", queue_size=2)
    p = orthonormal(32, 4, 0).T
    for step in (0, 10, 20):
        gap(projector, SimpleNamespace(step=step, old=None, new={"right": p}))
    assert projector.gap == 20 and gap.svd_count == 3


# ----------------------------------------------------------------------------- quantized projection store
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_quantized_store(bits):
    store = QuantizedStore(torch.bfloat16, bits, 64)
    with pytest.raises(RuntimeError, match="before the first refresh"):
        store.get()
    p = orthonormal(100, 8, 0)
    store.set(p)
    got = store.get()
    assert got.dtype == torch.bfloat16 and got.shape == p.shape
    assert (got.float() - p).abs().max() < (0.1 if bits == 4 else 0.01)
    assert sum(t.numel() * t.element_size() for t in store.state_tensors()) == QuantizedMatrix.from_float(p, bits, 64).nbytes
    again = QuantizedStore(torch.bfloat16, bits, 64)
    again.load_state_dict(store.state_dict())
    assert torch.equal(again.get(), got)


# ----------------------------------------------------------------------------- the Q-GaLore optimizer
def _qgalore_run(cfg: QGaLoreConfig, steps: int, grad_accum: int = 1, seed: int = 0):
    from estimator.config import TrainSetup
    from lowrank.methods import prepare
    from lowrank.step import training_step
    from tests.helpers import tiny_model

    setup = TrainSetup(batch_size=4, seq_len=32, dtype="fp32", grad_accum=grad_accum)
    prepared = prepare(tiny_model("llama", seed=seed), cfg, setup, lr=1e-2)
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (4, 32))
    batches = [{"input_ids": ids, "labels": ids}] * grad_accum
    losses = [training_step(prepared, batches, setup).loss for _ in range(steps)]
    return prepared, losses


@pytest.mark.parametrize("layerwise,grad_accum", [(True, 1), (True, 2), (False, 1)])
def test_qgalore_optimizer_lowers_the_loss(layerwise, grad_accum):
    cfg = QGaLoreConfig(rank=8, update_proj_gap=10, layerwise=layerwise)
    prepared, losses = _qgalore_run(cfg, 50, grad_accum)
    assert losses[-1] < 0.5 * losses[0]
    assert all(isinstance(layer, Int8Linear) for _, layer in int8_linears(prepared.model))
    assert prepared.trainable_parameters() == sum(p.numel() for p in tiny_model_params())


def tiny_model_params():
    from tests.helpers import tiny_model

    return list(tiny_model("llama").parameters())


def test_qgalore_projections_are_int4_and_gaps_adapt():
    cfg = QGaLoreConfig(rank=8, update_proj_gap=2, queue_size=2, cos_threshold=0.0)
    prepared, _ = _qgalore_run(cfg, 12)
    optimizer = prepared.optimizer
    stores = [store for proj in optimizer.projectors() for store in proj.stores.values()]
    assert stores and all(store.matrix.bits == 4 for store in stores)
    info = optimizer.layer_info()
    assert all(row["gap"] > 2 for row in info)  # threshold 0: every layer's gap doubled
    assert all(len(row["similarities"]) == row["svd_count"] for row in info)


def test_qgalore_state_dict_resumes_the_same_trajectory():
    cfg = QGaLoreConfig(rank=8, update_proj_gap=3)
    first, _ = _qgalore_run(cfg, 4)
    state = first.optimizer.state_dict()
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    second, _ = _qgalore_run(cfg, 1, seed=1)
    second.model.load_state_dict(weights)
    second.optimizer.load_state_dict(state)
    assert [row["gap"] for row in second.optimizer.layer_info()] == [row["gap"] for row in first.optimizer.layer_info()]
    assert [row["svd_count"] for row in second.optimizer.layer_info()] == \
        [row["svd_count"] for row in first.optimizer.layer_info()]
