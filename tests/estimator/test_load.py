"""The load moment (estimator/load.py): building or loading the model and preparing it, predicted
beside what the trainer's own code measures on the CPU (lowrank.recipe.load_model: build, cast,
move, prepare under a MemoryTracker), for every method, a preset and a folder with saved
weights, both QLoRA recipes; and every fit decision taking the larger of the step and the load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from estimator import gpus
from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate, estimate_spec
from estimator.load import built_dtype, load_moment
from estimator.spec import load_spec

MODEL = "tiny-llama-5m"
TOLERANCE = 0.03
METHODS = [FullConfig(), LoRAConfig(rank=8), QLoRAConfig(rank=8), QLoRAConfig(rank=8, compute_dtype="fp32"),
           QLoRAConfig(rank=8, recipe="peft"), GaLoreConfig(rank=16), QGaLoreConfig(rank=16)]
IDS = ["full", "lora", "qlora", "qlora-fp32-compute", "qlora-peft", "galore", "qgalore"]


def measured_load(model: str, method, setup: TrainSetup) -> int:
    """The load's peak as a CPU run measures it (the trainer's code path)."""
    from lowrank.recipe import RunSpec, load_model

    return load_model(RunSpec(model, method, setup), setup, torch.device("cpu"))[2]


def check(model: str, method, dtype: str):
    setup = TrainSetup(batch_size=1, seq_len=32, dtype=dtype)
    predicted = estimate(model, method, setup, device="cpu")
    measured = measured_load(model, method, setup)
    error = (predicted.load_bytes - measured) / measured
    assert abs(error) <= TOLERANCE, (predicted.load_moment, predicted.load_breakdown, measured)
    return predicted


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny-llama-5m saved in bf16, as a finished run's final/ holds it."""
    from transformers import AutoModelForCausalLM

    from estimator.spec import load_config

    folder = tmp_path_factory.mktemp("saved") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_config(MODEL)).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_a_preset_load_is_predicted(method, dtype):
    predicted = check(MODEL, method, dtype)
    if dtype == "bf16":  # built in fp32, then cast: on the CPU both exist at the first tensor's cast
        assert predicted.load_bytes > load_spec(MODEL).params_total * 4


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_a_folder_with_saved_weights_loads_in_their_dtype(saved, method, dtype):
    assert built_dtype(load_spec(saved)) == "bf16"
    predicted = check(saved, method, dtype)
    if dtype == "bf16" and isinstance(method, (FullConfig, GaLoreConfig)) and not isinstance(method, QGaLoreConfig):
        assert predicted.load_moment == "built (bf16)"  # nothing cast, nothing added


def test_the_load_is_in_the_json_and_the_cli():
    from estimator.cli import render

    est = estimate("llama-7b", QLoRAConfig(rank=64), TrainSetup())
    load = est.to_dict()["load"]
    assert load["peak_bytes"] == est.load_bytes == sum(load["breakdown"].values()) > 0
    assert set(load["breakdown"]) == {"weights", "cast", "quantized", "quantizing", "adapters"}
    assert f"load (build, cast, move, prepare): {est.load_bytes / 2**30:,.2f} GiB at {est.load_moment}" in render(est)


def test_on_a_gpu_only_what_reaches_it_counts():
    spec, setup = load_spec("llama-7b"), TrainSetup(dtype="bf16")
    full = load_moment(spec, FullConfig(), setup, "cuda")
    assert full.peak_bytes == spec.params_total * 2 + spec.float_buffer_numel * 2  # cast on the host first
    assert load_moment(spec, FullConfig(), setup, "cpu").peak_bytes > spec.params_total * 4  # fp32 + a copy
    qlora = load_moment(spec, QLoRAConfig(rank=64), setup, "cuda")
    assert qlora.peak_bytes < full.peak_bytes / 3  # one decoder linear in 16 bits at a time, never the model


def test_peft_recipe_defaults_and_step():
    assert QLoRAConfig().compute_dtype == "bf16" and QLoRAConfig(recipe="peft").compute_dtype == "fp32"
    assert QLoRAConfig(recipe="peft", compute_dtype="bf16").compute_dtype == "bf16"
    ours = estimate("llama-7b", QLoRAConfig(rank=64), TrainSetup(), device="cpu")
    peft = estimate("llama-7b", QLoRAConfig(rank=64, recipe="peft"), TrainSetup(), device="cpu")
    assert peft.breakdown["weights"] > ours.breakdown["weights"]  # embeddings, norms, lm_head in fp32
    assert peft.options["dtype"] == "bf16" and peft.options["recipe"] == "peft"  # the setup as given
    on_gpu = estimate("llama-7b", QLoRAConfig(rank=64, recipe="peft"), TrainSetup())
    assert on_gpu.breakdown["optimizer"] == 0 and any("paged optimizer states" in n for n in on_gpu.notes)


def test_what_a_gpu_needs_is_the_larger_peak():
    est = estimate("llama-7b", QGaLoreConfig(rank=1024), TrainSetup(batch_size=1, seq_len=64))
    assert est.load_bytes > est.peak_bytes  # the bf16 model on the GPU before its INT8 quantization
    assert est.total_bytes == est.load_bytes + est.overhead_bytes
    bigger = dataclasses.replace(est, load_bytes=30 * 2**30)
    rows = {row["gpu"]: row["fits"] for row in gpus.fit_table(bigger)}
    assert rows["H100 80GB"] and not rows["RTX 4090"]
    # a GPU the step alone would fit, but not the load: no batch size fits
    step_only = est.peak_bytes + est.overhead_bytes
    between = gpus.GPU("test", (step_only + est.total_bytes) // 2 // 2**20, "test")
    spec, setup = load_spec("llama-7b"), TrainSetup(batch_size=1, seq_len=64)
    assert gpus.max_batch_size(spec, QGaLoreConfig(rank=1024), setup, between) is None
    assert estimate_spec(spec, QGaLoreConfig(rank=1024), setup).total_bytes > between.memory_bytes


def test_under_fsdp_each_rank_loads_its_shard_block_by_block():
    spec = load_spec("llama2-70b")
    one = load_moment(spec, FullConfig(optimizer="sgd"), TrainSetup(batch_size=8), "cuda")
    ddp = load_moment(spec, FullConfig(optimizer="sgd"), TrainSetup(batch_size=8, gpus=8), "cuda")
    fsdp = load_moment(spec, FullConfig(optimizer="sgd"), TrainSetup(batch_size=8, gpus=8, shard="full"), "cuda")
    assert ddp.peak_bytes == one.peak_bytes  # every DDP rank holds the whole model
    assert one.peak_bytes / 8 < fsdp.peak_bytes < one.peak_bytes / 7  # its shards, one block whole, the root
