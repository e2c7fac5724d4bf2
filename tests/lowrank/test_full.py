"""The full-training baseline: every optimizer lowers the loss, and mixed precision keeps fp32 masters."""

from __future__ import annotations

import pytest
import torch

from estimator.config import FullConfig, TrainSetup
from lowrank.full import build_optimizer
from lowrank.methods import prepare
from lowrank.step import train_on, training_step
from tests.helpers import tiny_model


@pytest.mark.parametrize("optimizer,lr", [("adamw", 3e-3), ("adamw8bit", 3e-3), ("adafactor", 3e-2), ("sgd", 0.3)])
def test_every_optimizer_lowers_the_loss_in_50_steps(optimizer, lr):
    setup = TrainSetup(batch_size=4, seq_len=32, dtype="fp32")
    prepared = prepare(tiny_model("llama"), FullConfig(optimizer=optimizer), setup, lr=lr, grad_clip=1.0)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 32))
    losses = train_on(prepared, [{"input_ids": ids, "labels": ids}] * 50, setup)
    assert losses[-1] < 0.5 * losses[0]


def test_mixed_precision_keeps_fp32_master_weights_and_trains():
    setup = TrainSetup(batch_size=4, seq_len=32, dtype="fp32", autocast=True)
    prepared = prepare(tiny_model("llama"), FullConfig(), setup, lr=3e-3)
    assert all(p.dtype == torch.float32 for p in prepared.model.parameters())
    ids = torch.randint(0, 256, (4, 32))
    losses = train_on(prepared, [{"input_ids": ids, "labels": ids}] * 30, setup)
    assert losses[-1] < losses[0]


def test_pure_bf16_states_follow_the_weights():
    setup = TrainSetup(batch_size=2, seq_len=16, dtype="bf16")
    prepared = prepare(tiny_model("llama"), FullConfig(), setup, lr=1e-3)
    ids = torch.randint(0, 256, (2, 16))
    training_step(prepared, [{"input_ids": ids, "labels": ids}], setup)
    moments = [s["exp_avg"] for s in prepared.optimizer.state.values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)


def test_no_trainable_parameters_is_a_clear_error():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.parameters(), "adamw", 1e-3)
