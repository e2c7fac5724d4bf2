"""The dry run traces the real code on fake tensors: it must measure what a real step measures."""

from __future__ import annotations

import contextlib
import json
import resource
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup
from estimator.estimate import estimate
from estimator.spec import load_config
from lowrank.device import resolve_device
from lowrank.dryrun import dry_run, micro_batches
from lowrank.memory import MemoryTracker
from lowrank.methods import prepare
from lowrank.quant import dequantize, quantize, stochastic_update_
from lowrank.step import measure_steady_step
from lowrank.train import main
from tests.helpers import tiny_config

SETUP = TrainSetup(batch_size=2, seq_len=16)
GiB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with the config.json of a tiny Llama (GQA), as `dry_run` takes any model source."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_config("llama").save_pretrained(folder)
    return str(folder)


def real_step(model_source: str, method, setup: TrainSetup):
    """The same step on real CPU tensors: build, prepare, warm up, measure."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = load_config(model_source)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=setup.attn_implementation)
    prepared = prepare(model, method, setup, lr=1e-3)
    return measure_steady_step(prepared, micro_batches(config.vocab_size, setup, torch.device("cpu")), setup)


def same(fake, real) -> bool:
    return (fake.peak_bytes, fake.phase, fake.breakdown, fake.phase_peaks) == \
        (real.peak_bytes, real.phase, real.breakdown, real.phase_peaks)


@pytest.mark.parametrize("method, setup", [
    (FullConfig(), SETUP),
    (FullConfig(optimizer="adamw8bit"), SETUP),
    (LoRAConfig(rank=4), SETUP),
    (QLoRAConfig(rank=4), SETUP),
    (QLoRAConfig(rank=4, quant_type="fp4", double_quant=False), SETUP),
    (GaLoreConfig(rank=8), SETUP),
    (GaLoreConfig(rank=8, update_proj_gap=1, svd="exact"), SETUP),  # an SVD inside the measured step
    (GaLoreConfig(rank=8, optimizer="adamw8bit", layerwise=True), TrainSetup(batch_size=2, seq_len=16, grad_accum=2)),
    (QGaLoreConfig(rank=8), SETUP),
    (QGaLoreConfig(rank=8, update_proj_gap=1), SETUP),  # reads a similarity: NaN on fake tensors
    (FullConfig(), TrainSetup(batch_size=2, seq_len=16, dtype="fp32", autocast=True)),
    (LoRAConfig(rank=4), TrainSetup(batch_size=2, seq_len=16, grad_checkpointing=True)),
    (FullConfig(), TrainSetup(batch_size=2, seq_len=16, attn_implementation="eager")),
], ids=lambda v: getattr(v, "method", None) or "")
def test_dry_run_measures_exactly_what_a_real_cpu_step_measures(tiny, method, setup):
    fake = dry_run(tiny, method, setup, device="cpu")
    real = real_step(tiny, method, setup)
    assert same(fake, real), (fake, real)


@pytest.mark.parametrize("model_type, method", [
    ("qwen2", FullConfig()), ("gpt2", FullConfig()), ("gpt_neox", GaLoreConfig(rank=8)), ("mistral", QGaLoreConfig(rank=8)),
])
def test_tied_embeddings_and_other_families(tmp_path, model_type, method):
    tiny_config(model_type).save_pretrained(tmp_path)
    assert same(dry_run(str(tmp_path), method, SETUP, device="cpu"), real_step(str(tmp_path), method, SETUP))


def test_block_shortcut_of_int8_quantization_keeps_the_memory_trace():
    """On fake tensors quant.py runs one work block of many (they are alike); the trace must not change."""
    def trace(fake: bool):
        with FakeTensorMode() if fake else contextlib.nullcontext():
            torch.manual_seed(0)
            weight = torch.randn(1100, 2000)  # 2.2M elements: two full work blocks and a short last group
            tracker = MemoryTracker()
            with tracker:
                codes, scales, offsets = quantize(weight, 8, 256)
                dequantize(codes, scales, offsets, 256, torch.bfloat16)
                stochastic_update_(codes, scales, offsets, torch.randn(1100, 2000), 256)
            return tracker.result()
    assert same(trace(fake=True), trace(fake=False))


def peak_rss_growth(fn) -> int:
    """Bytes the peak resident memory of this process grew by while `fn` ran."""
    def hwm() -> int:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:  # reset the high-water mark (Linux), so earlier tests' peaks cannot hide ours
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = hwm()
    fn()
    return hwm() - before


def test_llama_7b_lora_matches_the_estimate_without_allocating_the_model():
    method, setup = LoRAConfig(rank=64), TrainSetup(batch_size=1, seq_len=256, dtype="bf16")
    result = {}
    growth = peak_rss_growth(lambda: result.update(measured=dry_run("llama-7b", method, setup, device="cpu")))
    measured = result["measured"]
    predicted = estimate("llama-7b", method, setup, device="cpu")
    assert measured.breakdown["weights"] > 12 * GiB  # the 6.7B bf16 weights are counted...
    assert growth < 1 * GiB  # ...but never allocated
    assert abs(measured.peak_bytes / predicted.peak_bytes - 1) < 0.05
    assert measured.phase == predicted.phase


def test_cuda_falls_back_to_cpu_without_a_cuda_build(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: fake CUDA tensors work")
    assert resolve_device("cuda", fake=True) == torch.device("cpu")
    with pytest.warns(UserWarning, match="fake CUDA tensors need a PyTorch built with CUDA"):
        measured = dry_run(tiny, LoRAConfig(rank=4), SETUP, device="cuda")
    assert same(measured, dry_run(tiny, LoRAConfig(rank=4), SETUP, device="cpu"))


@pytest.mark.gpu
def test_fake_cuda_counts_512_byte_blocks(tiny, gpu):
    for method in (LoRAConfig(rank=4), QLoRAConfig(rank=4), QGaLoreConfig(rank=8)):
        measured = dry_run(tiny, method, SETUP, device="cuda")
        assert measured.peak_bytes > 0 and all(v % 512 == 0 for v in measured.breakdown.values()), measured


def test_command_line_prints_measured_beside_estimated(tiny, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--model", tiny, "--method", "qlora", "--rank", "4", "--batch-size", "2", "--seq-len", "16",
                     "--device", "cpu", "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "adapters", "activations", "peak", "estimate error at the peak", "fake cpu tensors"):
        assert word in out
    summary = json.loads((tmp_path / "dry" / "summary.json").read_text())
    assert summary["status"] == "dry-run" and summary["comparison"]["within_targets"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-7", "--method", "lora"], "unknown preset"),
    (["--model", "llama-7b", "--method", "lora", "--update-proj-gap", "5"], "--update-proj-gap does not apply"),
    (["--model", "llama-7b", "--method", "galore", "--rank", "9000"], "--rank 9000"),
    (["--model", "llama-7b", "--method", "lora", "--device", "tpu"], "--device 'tpu' must be auto, cpu or cuda"),
])
def test_bad_input_is_one_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
