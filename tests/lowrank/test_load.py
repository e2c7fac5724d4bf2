"""Getting the model onto the device (lowrank/load.py): the trainer measures the load and writes it
beside the prediction, casts on the host, quantizes QLoRA's linears one at a time onto the device,
and the peft recipe prepares the model as peft does; the dry run measures the load on fake
tensors for every method."""

from __future__ import annotations

import json

import pytest
import torch

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate
from lowrank.load import cast_model, place
from lowrank.memory import MemoryTracker
from lowrank.methods import prepare
from lowrank.recipe import RunSpec, build_model, train

MODEL = "tiny-llama-5m"
SETUP = TrainSetup(batch_size=2, seq_len=64, dtype="bf16")
TOLERANCE = 0.03


def test_a_run_writes_its_measured_load_beside_the_prediction(tmp_path):
    from lowrank.report import comparison_table
    from ui.runs import Board, results_table, view_from_folder

    method = QLoRAConfig(rank=8, recipe="peft")
    spec = RunSpec(MODEL, method, SETUP, out=str(tmp_path / "run"), steps=2, eval_every=0, checkpoint_minutes=0)
    summary = train(spec, progress=False)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["status"] == "completed" and saved["load_peak_bytes"] == summary["load_peak_bytes"] > 0
    assert saved["measured"]["load_peak_bytes"] == saved["load_peak_bytes"]
    assert abs(saved["comparison"]["load_error"]) <= TOLERANCE, saved["comparison"]
    assert abs(saved["comparison"]["peak_error"]) <= TOLERANCE, saved["comparison"]  # the peft recipe's step
    assert saved["predicted"]["load"]["peak_bytes"] == estimate(MODEL, method, SETUP, device="cpu").load_bytes
    assert "\nload " in comparison_table(saved["predicted"], saved["measured"])
    row = results_table(Board([view_from_folder(tmp_path / "run")])).iloc[0]
    assert row["predicted load"] != "—" and row["measured load"] != "—"


def test_the_cast_is_module_to_one_tensor_at_a_time():
    from tests.helpers import tiny_model

    model = tiny_model("qwen2")  # tied embeddings
    tracker = MemoryTracker(records=False)
    with tracker:
        tracker.watch(list(model.parameters()) + list(model.buffers()), "weights")
        before = tracker.current_bytes
        cast_model(model, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    embedding = model.model.embed_tokens.weight.numel()
    assert tracker.current_bytes == before // 2 and tracker.result().peak_bytes == before + 2 * embedding


@pytest.mark.parametrize("method", [FullConfig(), QGaLoreConfig(rank=16), QLoRAConfig(rank=8),
                                    QLoRAConfig(rank=8, recipe="peft")], ids=["full", "qgalore", "qlora", "qlora-peft"])
def test_place_keeps_qloras_linears_on_the_host_until_each_is_quantized_onto_the_device(method):
    """"meta" stands in for the GPU: what reaches it costs nothing here, what stays behind is on the CPU."""
    net, _ = build_model(RunSpec(MODEL, method, SETUP), SETUP)
    net = place(net, method, SETUP, "meta")
    linears = {p.device.type for n, p in net.named_parameters() if "_proj" in n}
    others = {p.device.type for n, p in net.named_parameters() if "_proj" not in n}
    assert others == {"meta"} and linears == ({"cpu"} if isinstance(method, QLoRAConfig) else {"meta"})
    prepared = prepare(net, method, SETUP, lr=1e-3)
    assert {p.device.type for p in prepared.model.parameters()} == {"meta"}


def test_the_peft_recipe_prepares_the_model_as_peft_does():
    from bitsandbytes.nn import Linear4bit
    from bitsandbytes.optim import PagedAdamW32bit

    from lowrank.lora import lora_parameters

    prepared = {}
    for recipe in ("ours", "peft"):
        method = QLoRAConfig(rank=8, recipe=recipe)
        net, _ = build_model(RunSpec(MODEL, method, SETUP), SETUP)
        prepared[recipe] = prepare(place(net, method, SETUP, "cpu"), method, SETUP, lr=1e-3)
    model = prepared["peft"].model
    floats = {p.dtype for m in model.modules() if not isinstance(m, Linear4bit)
              for p in m.parameters(recurse=False) if p.is_floating_point()}
    assert floats == {torch.float32}  # embeddings, norms, lm_head, adapters
    assert {p.dtype for p in lora_parameters(prepared["ours"].model)} == {torch.bfloat16}
    assert isinstance(prepared["peft"].optimizer, PagedAdamW32bit)
    assert model.is_gradient_checkpointing
    layer = model.model.layers[0]
    assert layer._gradient_checkpointing_func.keywords.get("use_reentrant") is True
    ids = torch.randint(0, 100, (1, 8))
    assert model.get_input_embeddings()(ids).requires_grad  # enable_input_require_grads


@pytest.mark.parametrize("method", [FullConfig(), LoRAConfig(rank=8), QLoRAConfig(rank=8), GaLoreConfig(rank=16),
                                    QGaLoreConfig(rank=16), QLoRAConfig(rank=8, recipe="peft")],
                         ids=["full", "lora", "qlora", "galore", "qgalore", "qlora-peft"])
def test_a_dry_run_measures_the_load_on_fake_tensors(method):
    from lowrank.dryrun import dry_run

    setup = TrainSetup(batch_size=1, seq_len=32, dtype="bf16")
    measured = dry_run(MODEL, method, setup, device="cpu")
    predicted = estimate(MODEL, method, setup, device="cpu")
    assert abs(predicted.load_bytes - measured.load_peak_bytes) <= TOLERANCE * measured.load_peak_bytes
    assert measured.to_dict()["load_peak_bytes"] == measured.load_peak_bytes


def test_load_memory_counts_saved_weights_mapped_from_their_files(tmp_path):
    """from_pretrained maps safetensors into memory through no operator: `watch` counts them."""
    from lowrank.recipe import load_model

    net, _ = build_model(RunSpec(MODEL, FullConfig(), SETUP), SETUP)
    cast_model(net, torch.bfloat16).save_pretrained(tmp_path / "saved")
    _, pretrained, peak = load_model(RunSpec(str(tmp_path / "saved"), FullConfig(), SETUP), SETUP,
                                     torch.device("cpu"))
    weights = sum(p.numel() * 2 for p in net.parameters()) + sum(b.numel() * b.element_size() for b in net.buffers())
    assert pretrained and abs(peak - weights) <= 1024  # and the rotary tables the load computes
