"""GaLore: against torch's AdamW and galore-torch, layer-wise = normal path, 8-bit, SVD, schedule."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch

from estimator.config import GaLoreConfig, TrainSetup
from lowrank import projector as projector_module
from lowrank.galore import GaLoreAdamW, build_galore_optimizer, galore_param_groups
from lowrank.methods import LowRankOptimizer, Prepared
from lowrank.projector import GaLoreProjector, exact_svd, randomized_svd
from lowrank.step import measure_optimizer_step, training_step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster and immune to other processes hogging the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=128)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (4, 32), generator=gen) for _ in range(n)]


def prepared(model, optimizer) -> Prepared:
    """Ours report the norm (LowRankOptimizer); galore-torch's do not."""
    lowrank = optimizer if isinstance(optimizer, LowRankOptimizer) else None
    return Prepared(model, optimizer, GaLoreConfig(), lowrank=lowrank)


def train(model, optimizer, data: list[torch.Tensor], accum: int = 1) -> tuple[list[float], list[float]]:
    """One optimizer step per `accum` consecutive batches; returns losses and grad norms per step."""
    outcomes = [training_step(prepared(model, optimizer), [{"input_ids": x, "labels": x} for x in
                                                           data[start:start + accum]], TrainSetup())
                for start in range(0, len(data), accum)]
    return [o.loss for o in outcomes], [o.grad_norm for o in outcomes]


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------- against AdamW
def identity_svd(a: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = a.shape
    return torch.eye(m)[:, :rank], torch.eye(n)[:rank]


def test_full_rank_identity_basis_follows_torch_adamw(model, monkeypatch):
    """Every moment, bias correction, decay and non-projected update equals torch's AdamW.

    At full rank GaLore is Adam in the rotated basis of the SVD (see the next test), so this
    test fixes the basis to the identity to compare element for element.
    """
    monkeypatch.setitem(projector_module.SVD_FUNCTIONS, "exact", identity_svd)
    reference = copy.deepcopy(model)
    cfg = GaLoreConfig(rank=64, update_proj_gap=3, scale=1.0, svd="exact", targets="mlp")  # mlp weights: min dim 64
    optimizer = build_galore_optimizer(model, cfg, lr=1e-2, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    data = batches(8)
    train(model, optimizer, data)
    train(reference, torch_adamw, data)
    assert max_diff(model, reference) < 1e-5


def test_full_rank_exact_svd_is_adamw_in_the_rotated_basis():
    """W = W' P with P the full-rank right singular basis: GaLore on W is torch's AdamW on W'.

    (Adam is not rotation-invariant, so full-rank GaLore is not AdamW on W itself: after one step
    at lr 1e-3 a tiny Llama differs by ~4e-3. This is the exact statement that holds.)
    """
    torch.manual_seed(0)
    target, start = torch.randn(48, 16), torch.randn(48, 16)
    w = start.clone().requires_grad_()
    optimizer = GaLoreAdamW([{"params": [w], "rank": 16, "update_proj_gap": 1000, "scale": 1.0, "proj_type": "std",
                              "svd": "exact"}], lr=1e-2, weight_decay=0.1)
    w_rotated = None
    for step in range(10):
        loss = 0.5 * ((w - target) ** 2 * torch.arange(1, 17)).sum()
        loss.backward()
        optimizer.step()
        if step == 0:  # the basis is chosen at the first step; replay that step with AdamW on W'
            basis = optimizer.projectors()[0].matrices()["right"]  # (16, 16), orthogonal
            w_rotated = (start @ basis.T).requires_grad_()
            adamw = torch.optim.AdamW([w_rotated], lr=1e-2, weight_decay=0.1, foreach=False)
        loss_rotated = 0.5 * ((w_rotated @ basis - target) ** 2 * torch.arange(1, 17)).sum()
        loss_rotated.backward()
        adamw.step()
        adamw.zero_grad()
        w.grad = None
    assert torch.allclose(w.detach(), w_rotated.detach() @ basis, atol=1e-5)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_full_rank_projection_is_lossless(proj_type):
    torch.manual_seed(0)
    grad = torch.randn(24, 40)
    projector = GaLoreProjector((24, 40), rank=24, update_proj_gap=10, proj_type=proj_type, svd="exact")
    projector.refresh(grad, step=0)
    if proj_type in ("std", "left", "full"):  # these project the 24-side: lossless at rank 24
        assert torch.allclose(projector.project_back(projector.project(grad)), grad, atol=1e-5)
    low = projector.project(grad)
    assert low.shape == projector.low_rank_shape()
    weight = torch.zeros(24, 40)
    projector.add_back_(weight, low, alpha=2.0)
    assert torch.allclose(weight, 2 * projector.project_back(low), atol=1e-5)


@pytest.mark.parametrize("proj_type,dtype", [("std", torch.float32), ("std", torch.float64),
                                              ("reverse_std", torch.float64), ("left", torch.float64),
                                              ("right", torch.float64), ("full", torch.float64)],
                         ids=["std-fp32", "std-fp64", "reverse_std-fp64", "left-fp64", "right-fp64", "full-fp64"])
def test_follows_galore_torch_for_20_steps(model, proj_type, dtype):
    """Same groups and hyperparameters, exact SVD refreshed at steps 0, 5, 10 and 15.

    eps 1e-20: galore-torch adds eps to √v before the bias correction, torch (and we) after it,
    which shows on the tiny gradients of a random model unless eps is negligible. Weight decay
    off: galore-torch decays after the step, torch before. float64 for the other projection
    types: "full"'s low-rank gradient Uᵀ G Vᵀ is diagonal up to rounding on refresh steps, and
    Adam's normalization blows that rounding noise up to ±1 — it differs with the matmul order.
    """
    from galore_torch import GaLoreAdamW as ReferenceGaLore

    model.to(dtype)
    reference = copy.deepcopy(model)
    cfg = GaLoreConfig(rank=8, update_proj_gap=5, scale=0.25, svd="exact", proj_type=proj_type)
    optimizer = build_galore_optimizer(model, cfg, lr=1e-2, eps=1e-20)
    groups = galore_param_groups(reference, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_optimizer = ReferenceGaLore(
            [{"params": [p for _, p in groups[0]["params"]], "rank": 8, "update_proj_gap": 5, "scale": 0.25,
              "proj_type": proj_type}, {"params": [p for _, p in groups[1]["params"]]}],
            lr=1e-2, eps=1e-20, weight_decay=0.0, no_deprecation_warning=True)
    data = batches(20)
    train(model, optimizer, data)
    train(reference, ref_optimizer, data)
    assert all(p.n_svd == 4 for p in optimizer.projectors())
    assert max_diff(model, reference) < (1e-5 if dtype == torch.float32 else 1e-6)


# ---------------------------------------------------------------------------- layer-wise
@pytest.mark.parametrize("accum,optim,stagger", [(1, "adamw", False), (3, "adamw", False), (3, "adamw", True),
                                                 (1, "adamw8bit", False)])
def test_layerwise_matches_normal_path(model, accum, optim, stagger):
    """Same weights and grad norms, with grad accumulation across refresh steps and clipping.

    In float64: summing projected micro-batch gradients rounds differently from projecting their
    sum, and in fp32 that 1e-7 can tilt the rank-8 subspace of the next SVD when two singular
    values nearly tie. In float64 the SVD's fp32 input is the same to the last bit.
    """
    model.double()
    layerwise_model = copy.deepcopy(model)
    cfg = GaLoreConfig(rank=8, update_proj_gap=2, scale=0.25, optimizer=optim, stagger=stagger)
    normal = build_galore_optimizer(model, cfg, lr=1e-2, weight_decay=0.05, grad_clip=0.3)
    layerwise = build_galore_optimizer(layerwise_model, dataclasses.replace(cfg, layerwise=True),
                                       lr=1e-2, weight_decay=0.05, grad_clip=0.3, grad_accum=accum)
    data = batches(5 * accum)  # 5 steps: refreshes at 0, 2, 4
    _, norms = train(model, normal, data, accum)
    _, layerwise_norms = train(layerwise_model, layerwise, data, accum)
    assert max_diff(model, layerwise_model) < 1e-10
    assert layerwise_norms == pytest.approx(norms, rel=1e-4)
    assert all(p.grad is None for p in layerwise_model.parameters())


def test_layerwise_accumulation_keeps_low_rank_gradients_only(model):
    """Between micro-batches: projected weights hold an r-sized sum, others their .grad; on a
    refresh step (here the first) projected weights keep the full gradient for the SVD."""
    optimizer = build_galore_optimizer(model, GaLoreConfig(rank=4, update_proj_gap=200, layerwise=True), lr=1e-3,
                                       grad_accum=3)
    projected = {id(p) for _, p in galore_param_groups(model, GaLoreConfig(rank=4))[0]["params"]}
    data = batches(4)
    model(input_ids=data[0], labels=data[0], use_cache=False).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # refresh step: nothing projected yet
    assert optimizer.gradient_tensors() == []
    train(model, optimizer, data[1:3], accum=2)  # the 2 remaining micro-batches: the step ends
    model(input_ids=data[3], labels=data[3], use_cache=False).loss.backward()
    assert all((p.grad is None) == (id(p) in projected) for p in model.parameters())
    shapes = sorted(tuple(t.shape) for t in optimizer.gradient_tensors())
    assert shapes == sorted(p.low_rank_shape() for p in optimizer.projectors())


def test_layerwise_rejects_more_micro_batches_than_told(model):
    optimizer = build_galore_optimizer(model, GaLoreConfig(rank=4, layerwise=True), lr=1e-3, grad_accum=1)
    assert optimizer.layerwise and optimizer.grad_accum == 1  # its hooks count the backward passes
    x = batches(1)[0]
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    with pytest.raises(RuntimeError, match="grad_accum=1"):
        model(input_ids=x, labels=x, use_cache=False).loss.backward()


def test_lr_scheduler_drives_layerwise_updates(model):
    optimizer = build_galore_optimizer(model, GaLoreConfig(rank=4, layerwise=True), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step == 0 else 0.0)
    data = batches(3)
    train(model, optimizer, data[:1])
    scheduler.step()
    before = copy.deepcopy(model)
    train(model, optimizer, data[1:])
    assert max_diff(model, before) == 0.0  # lr 0 from step 1 on, read by the hooks


# ---------------------------------------------------------------------------- 8-bit, SVD, loss
def test_8bit_runs_on_cpu_and_lowers_loss(model):
    cfg = GaLoreConfig(rank=8, update_proj_gap=10, scale=0.25, optimizer="adamw8bit")
    optimizer = GaLoreAdamW(galore_param_groups(model, cfg), lr=1e-2, optim_bits=8, min_8bit_size=0)
    data = batches(4) * 8
    losses, _ = train(model, optimizer, data)
    assert losses[-1] < 0.8 * losses[0]
    state = optimizer.state[model.model.layers[0].mlp.up_proj.weight]  # 128×64 -> moments 128×8
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == (128, 8)
    assert state["exp_avg_absmax"].shape == (math.ceil(128 * 8 / 256),)
    assert state["qmap_signed"].shape == (256,) and state["projector"].matrices()["right"].shape == (8, 64)


def test_galore_lowers_the_loss_in_50_steps(model):
    optimizer = build_galore_optimizer(model, GaLoreConfig(rank=8, update_proj_gap=20, scale=0.25), lr=1e-2)
    losses, norms = train(model, optimizer, batches(5) * 10)
    assert losses[-1] < 0.6 * losses[0]
    assert all(n is not None and math.isfinite(n) for n in norms)


@pytest.mark.parametrize("shape", [(256, 512), (512, 256)])
def test_randomized_svd_finds_the_exact_subspace(shape):
    torch.manual_seed(0)
    m, n = shape
    spectrum = 0.7 ** torch.arange(min(m, n), dtype=torch.float32)  # low-rank-ish: decaying values
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n)))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n)))
    a = (u * spectrum) @ v.T + 1e-6 * torch.randn(m, n)
    u_exact, vh_exact = exact_svd(a, 16)
    u_fast, vh_fast = randomized_svd(a, 16, seed=1)
    # cosines of the principal angles between the subspaces: all ≈ 1
    assert torch.linalg.svdvals(u_exact.T @ u_fast).min() > 0.999
    assert torch.linalg.svdvals(vh_exact @ vh_fast.T).min() > 0.999


def test_stagger_spreads_refreshes():
    def refresh_steps(stagger: bool) -> list[list[int]]:
        torch.manual_seed(0)
        params = [torch.zeros(16, 8, requires_grad=True) for _ in range(14)]
        optimizer = GaLoreAdamW([{"params": params, "rank": 4, "update_proj_gap": 7, "scale": 1.0,
                                  "proj_type": "std", "stagger": stagger}], lr=1e-3)
        refreshed = []
        for _ in range(21):
            before = [p.n_svd for p in optimizer.projectors()]
            for p in params:
                p.grad = torch.randn(16, 8)
            optimizer.step()
            refreshed.append([i for i, p in enumerate(optimizer.projectors()) if p.n_svd > before[i]])
        return refreshed

    plain, staggered = refresh_steps(False), refresh_steps(True)
    assert [len(r) for r in plain] == [14, 0, 0, 0, 0, 0, 0, 14] + [0] * 6 + [14] + [0] * 6
    assert len(staggered[0]) == 14  # every layer needs a first subspace
    assert max(len(r) for r in staggered[1:]) == 2  # then 14 layers over a gap of 7 steps
    assert sum(len(r) for r in staggered[1:]) == 14 * 20 // 7  # each layer once per gap


def test_rank_larger_than_a_weight_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"rank=40 .*k_proj.*set rank ≤ 32"):  # k_proj is 32×64
        build_galore_optimizer(model, GaLoreConfig(rank=40), lr=1e-3)


def test_bad_optimizer_options_are_named_at_once():
    w = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"lr=-1 must be ≥ 0; betas=\(1.0, 0.9\) must be"):
        GaLoreAdamW([w], lr=-1, betas=(1.0, 0.9))


# ---------------------------------------------------------------------------- state and memory
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit"])
def test_state_dict_resumes_exactly(model, optim):
    cfg = GaLoreConfig(rank=8, update_proj_gap=3, scale=0.25, optimizer=optim, stagger=True)
    data = batches(8)
    optimizer = GaLoreAdamW(galore_param_groups(model, cfg), lr=1e-2, optim_bits=8 if optim == "adamw8bit" else 32,
                            min_8bit_size=0)
    train(model, optimizer, data[:4])
    saved_model, saved = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, data[4:])
    resumed = GaLoreAdamW(galore_param_groups(saved_model, cfg), lr=1e-2,
                          optim_bits=8 if optim == "adamw8bit" else 32, min_8bit_size=0)
    resumed.load_state_dict(saved)
    train(saved_model, resumed, data[4:])
    assert max_diff(model, saved_model) == 0.0
    assert [p.info() for p in resumed.projectors()] == [p.info() for p in optimizer.projectors()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_states_and_projections_are_in_the_weight_dtype(model, dtype):
    model.to(dtype)
    optimizer = build_galore_optimizer(model, GaLoreConfig(rank=4), lr=1e-3)
    train(model, optimizer, batches(1))
    tensors = optimizer.state_tensors()
    assert tensors and all(t.dtype == dtype for t in tensors)
    info = optimizer.layer_info()
    assert len(info) == 14 and info[0]["svd_count"] == 1 and info[0]["gap"] == 200


def test_step_allocates_no_full_size_temporary(model):
    """Steady-state step (no refresh) of projected weights: only low-rank temporaries."""
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in name and name.endswith("proj.weight"))
    optimizer = build_galore_optimizer(model, GaLoreConfig(rank=4, update_proj_gap=100), lr=1e-3)
    x = batches(1)[0]
    train(model, optimizer, [x])
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    transient = measure_optimizer_step(prepared(model, optimizer)).breakdown["transient"]
    smallest_weight = min(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert 0 < transient < smallest_weight


def test_our_galore_optimizers_declare_what_the_loop_may_ask(model):
    from lowrank.qgalore import QGaLoreAdamW

    ours = build_galore_optimizer(model, GaLoreConfig(rank=4), lr=1e-3)
    assert isinstance(ours, LowRankOptimizer) and LowRankOptimizer in QGaLoreAdamW.__mro__
    assert not isinstance(torch.optim.AdamW(model.parameters()), LowRankOptimizer)
    assert ours.extra_trainable_numel() == 0 and ours.grad_accum == 1 and not ours.layerwise
