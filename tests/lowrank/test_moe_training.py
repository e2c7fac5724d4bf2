"""Training mixture-of-experts models: GaLore treats a fused expert weight (E, m, n) as the E matrices
it holds, LoRA leaves the experts frozen, Q-GaLore projects them in their float dtype."""

from __future__ import annotations

import copy

import pytest
import torch

from estimator.config import GaLoreConfig, LoRAConfig, QGaLoreConfig, TrainSetup
from lowrank.galore import ExpertProjectors, GaLoreAdamW
from lowrank.lora import lora_layers
from lowrank.methods import prepare
from lowrank.qgalore import int8_linears
from lowrank.step import training_step

TINY_MOE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2)


def tiny_moe(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **TINY_MOE))


def run(cfg, steps: int, model=None, seed: int = 0):
    setup = TrainSetup(batch_size=4, seq_len=32, dtype="fp32")
    prepared = prepare(model or tiny_moe(seed), cfg, setup, lr=1e-2)
    torch.manual_seed(seed)
    ids = torch.randint(0, 256, (4, 32))
    losses = [training_step(prepared, [{"input_ids": ids, "labels": ids}], setup).loss for _ in range(steps)]
    return prepared, losses


def experts(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.dim() == 3}


# ------------------------------------------------------------------------------ GaLore on 3-D weights
@pytest.mark.parametrize("options", [{}, {"optim_bits": 8}, {"grad_clip": 0.5}, {"layerwise": True},
                                     {"layerwise": True, "grad_accum": 2}, {"proj_type": "full"},
                                     {"dtype": torch.bfloat16}],
                         ids=["adamw", "8bit", "clip", "layerwise", "layerwise-accum", "full-proj", "bf16"])
def test_a_fused_expert_weight_trains_as_its_separate_matrices(options):
    """GaLore on (E, m, n) is GaLore on E separate (m, n) weights, bit for bit: own projections
    (refreshed every 2 steps), own moments and 8-bit blocks, own norms and clipping."""
    options = dict(options)
    dtype, accum = options.pop("dtype", torch.float32), options.get("grad_accum", 1)
    proj_type = options.pop("proj_type", "std")
    torch.manual_seed(0)
    e, m, n = 3, 48, 32
    fused = torch.nn.Parameter(torch.randn(e, m, n, dtype=dtype))
    separate = [torch.nn.Parameter(fused.detach()[i].clone()) for i in range(e)]
    group = dict(rank=8, update_proj_gap=2, scale=0.5, proj_type=proj_type, svd="exact")
    kwargs = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=64, **options)
    a = GaLoreAdamW([{"params": [fused], **group}], **kwargs)
    b = GaLoreAdamW([{"params": separate, **group}], **kwargs)
    for _ in range(5):
        for _ in range(accum):
            grad = torch.randn(e, m, n, dtype=dtype)
            (fused * grad).sum().backward()
            sum((w * grad[i]).sum() for i, w in enumerate(separate)).backward()
        a.step(), b.step()
        a.zero_grad(), b.zero_grad()
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)  # summed in another order
    assert torch.equal(fused.detach(), torch.stack([w.detach() for w in separate]))
    assert isinstance(a.state[fused]["projector"], ExpertProjectors)
    assert [row["shape"] for row in a.layer_info()] == [(m, n)] * e


def test_galore_projects_every_expert_and_resumes_exactly():
    cfg = GaLoreConfig(rank=8, update_proj_gap=3, optimizer="adamw8bit")
    first, losses = run(cfg, 4)
    assert losses[-1] < losses[0]
    projected = [p for group in first.optimizer.param_groups if "rank" in group for p in group["params"]]
    assert sum(p.dim() == 3 for p in projected) == 4  # gate_up_proj and down_proj of 2 blocks
    assert len(first.optimizer.layer_info()) == 4 * 2 + 4 * 4  # q, k, v, o of 2 blocks; 4 experts × 4 tensors
    saved_model, saved = copy.deepcopy(first.model), copy.deepcopy(first.optimizer.state_dict())
    resumed, _ = run(cfg, 0, model=saved_model)  # a fresh optimizer, loaded from the saved state
    resumed.optimizer.load_state_dict(saved)
    setup = TrainSetup(batch_size=4, seq_len=32, dtype="fp32")
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (4, 32))
    for prepared in (first, resumed):
        for _ in range(3):
            training_step(prepared, [{"input_ids": ids, "labels": ids}], setup)
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), resumed.model.parameters()))


# ------------------------------------------------------------------------------ LoRA and Q-GaLore
def test_lora_adapts_attention_and_leaves_experts_frozen():
    model = tiny_moe()
    before = experts(model)
    prepared, losses = run(LoRAConfig(rank=4), 5, model=model)
    assert losses[-1] < losses[0]
    assert {path.rsplit(".", 1)[-1] for path in lora_layers(prepared.model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    after = experts(prepared.model)
    assert all(not p.requires_grad for name, p in prepared.model.named_parameters() if name in after)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_qgalore_projects_experts_in_their_float_dtype():
    model = tiny_moe()
    before = experts(model)
    prepared, losses = run(QGaLoreConfig(rank=8, update_proj_gap=2), 6, model=model)
    assert losses[-1] < 0.8 * losses[0]
    assert {path.rsplit(".", 1)[-1] for path, _ in int8_linears(prepared.model)} == {"q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"}
    after = experts(prepared.model)
    assert all(after[name].dtype == torch.float32 and not torch.equal(before[name], after[name]) for name in before)
    rows = prepared.optimizer.layer_info()
    assert len(rows) == 4 * 2 + 4 * 4
    assert all(len(row["similarities"]) == row["svd_count"] for row in rows)
    state = prepared.optimizer.state_dict()  # per-expert gaps and INT4 projections survive a reload
    prepared.optimizer.load_state_dict(copy.deepcopy(state))
    assert [row["gap"] for row in prepared.optimizer.layer_info()] == [row["gap"] for row in rows]
