"""Static terms against real tensors: weights of real models (plain, NF4, INT8) and the optimizer
states torch, bitsandbytes and our GaLore optimizers allocate after one step."""

from __future__ import annotations

import pytest
import torch

from estimator import estimate as est
from estimator import gpus
from estimator import memory as mem
from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.spec import spec_from_config
from lowrank.memory import MemoryTracker
from lowrank.methods import prepare
from lowrank.step import training_step
from tests.helpers import TINY, tiny_config, tiny_model


def stored_bytes(prepared) -> dict[str, int]:
    """Bytes of every distinct storage the prepared model and its optimizer hold, by category."""
    tracker = MemoryTracker()
    tracker.watch_model(prepared.model)
    tracker.watch(prepared.state_tensors(), "optimizer")
    return tracker.breakdown_at(tracker.clock)


def one_step(model_type: str, method, dtype: str = "bf16", **overrides):
    model = tiny_model(model_type, **overrides)
    setup = TrainSetup(batch_size=2, seq_len=16, dtype=dtype)
    prepared = prepare(model, method, setup, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    training_step(prepared, [{"input_ids": ids, "labels": ids}], setup)
    return prepared, spec_from_config(model.config, model_type), setup


@pytest.mark.parametrize("model_type", list(TINY))
@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_weights_equal_numel_times_itemsize(model_type, dtype, torch_dtype):
    model = tiny_model(model_type).to(torch_dtype)
    real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    spec = spec_from_config(model.config, model_type)
    assert mem.weights_bytes(spec, FullConfig(), TrainSetup(dtype=dtype)) == real


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_qlora_weights_are_the_stored_nf4_bytes(double_quant, targets):
    method = QLoRAConfig(rank=4, double_quant=double_quant, targets=targets)
    prepared, spec, setup = one_step("llama", method)
    real = stored_bytes(prepared)
    assert mem.weights_bytes(spec, method, setup) == real["weights"]
    assert mem.adapters_bytes(spec, method, setup) == real["adapters"]


def test_qgalore_int8_weights_and_int4_projections():
    method = QGaLoreConfig(rank=8, update_proj_gap=5)
    prepared, spec, setup = one_step("llama", method)
    real = stored_bytes(prepared)
    assert mem.weights_bytes(spec, method, setup) == real["weights"]
    assert mem.optimizer_bytes(spec, method, setup) == real["optimizer"]


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "adafactor", "sgd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_full_optimizer_states_after_one_step(optimizer, dtype):
    method = FullConfig(optimizer=optimizer)
    prepared, spec, setup = one_step("llama", method, dtype, intermediate_size=4096)  # some 8-bit sized tensors
    assert mem.optimizer_bytes(spec, method, setup) == stored_bytes(prepared)["optimizer"]


@pytest.mark.parametrize("method", [LoRAConfig(rank=8), LoRAConfig(rank=4, targets="attention", optimizer="adamw8bit"),
                                    QLoRAConfig(rank=8, optimizer="sgd")])
def test_lora_optimizer_states_after_one_step(method):
    prepared, spec, setup = one_step("llama", method)
    assert mem.optimizer_bytes(spec, method, setup) == stored_bytes(prepared)["optimizer"]


@pytest.mark.parametrize("method", [GaLoreConfig(rank=8), GaLoreConfig(rank=8, optimizer="adamw8bit"),
                                    GaLoreConfig(rank=8, proj_type="full"), GaLoreConfig(rank=16, targets="mlp"),
                                    QGaLoreConfig(rank=8, proj_bits=8, optimizer="adamw")])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_galore_optimizer_states_after_one_step(method, dtype):
    prepared, spec, setup = one_step("llama", method, dtype, intermediate_size=4096)
    assert mem.optimizer_bytes(spec, method, setup) == stored_bytes(prepared)["optimizer"]


def test_trainable_parameter_counts():
    for method in (FullConfig(), LoRAConfig(rank=4), QLoRAConfig(rank=4), GaLoreConfig(rank=8), QGaLoreConfig(rank=8)):
        prepared, spec, _ = one_step("llama", method)
        assert mem.params_trainable(spec, method) == prepared.trainable_parameters()


def test_gpu_fit_uses_peak_plus_overhead():
    estimate = est.estimate("llama-7b", GaLoreConfig(rank=1024, optimizer="adamw8bit", layerwise=True),
                            TrainSetup(batch_size=1, seq_len=256))
    rows = {row["gpu"]: row for row in gpus.fit_table(estimate)}
    assert rows["RTX 4090"]["fits"] and not rows["RTX 4060 Ti 16GB"]["fits"]
    need = estimate.peak_bytes + estimate.overhead_bytes
    assert rows["RTX 4090"]["headroom_gib"] == pytest.approx((24564 * 2**20 - need) / 2**30, abs=0.01)


def test_max_batch_size_is_the_largest_that_fits():
    spec = spec_from_config(tiny_config("llama"), "x")
    setup = TrainSetup(batch_size=1, seq_len=512)
    gpu = gpus.GPU("test", 2048, "test")
    largest = gpus.max_batch_size(spec, LoRAConfig(rank=8), setup, gpu)
    fits = est.estimate_spec(spec, LoRAConfig(rank=8), TrainSetup(batch_size=largest, seq_len=512))
    too_big = est.estimate_spec(spec, LoRAConfig(rank=8), TrainSetup(batch_size=largest + 1, seq_len=512))
    assert fits.total_bytes <= gpu.memory_bytes < too_big.total_bytes
    assert gpus.max_batch_size(est.load_spec("llama2-70b"), FullConfig(), setup, gpu) is None


@pytest.mark.parametrize("method", [FullConfig(), LoRAConfig(rank=4), QLoRAConfig(rank=4), GaLoreConfig(rank=8),
                                    QGaLoreConfig(rank=8)])
def test_linears_no_gradient_reaches_hold_no_gradient_or_state(method):
    """TrOCR's decoder blocks carry a cross-attention to an image encoder a text-only step never
    calls: its linears are held (quantized and adapted like the rest), but get no gradient and no
    optimizer state; the trainer still counts them as trainable (was +13.9% on gradients and
    optimizer states under full training)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("trocr", d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                  decoder_ffn_dim=128, vocab_size=512, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    setup = TrainSetup(batch_size=2, seq_len=16, dtype="bf16")
    spec = spec_from_config(model.config, "trocr")
    assert {lin.short for lin in spec.idle_linears} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert spec.unreached_modules == ("layers.*.encoder_attn", "layers.*.encoder_attn_layer_norm")
    prepared = prepare(model, method, setup, lr=1e-3)
    ids = torch.randint(0, 512, (2, 16))
    training_step(prepared, [{"input_ids": ids, "labels": ids}], setup)
    real = stored_bytes(prepared)
    assert mem.weights_bytes(spec, method, setup) == real["weights"]
    assert mem.adapters_bytes(spec, method, setup) == real["adapters"]
    assert mem.optimizer_bytes(spec, method, setup) == real["optimizer"]
    if not isinstance(method, GaLoreConfig):  # GaLore's layer-wise hooks free theirs
        prepared.model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for p in prepared.model.parameters() if p.grad is not None]
        assert mem.gradient_bytes(spec, method, setup) == sum(g.numel() * g.element_size() for g in grads)
    assert mem.params_trainable(spec, method) == prepared.trainable_parameters()
