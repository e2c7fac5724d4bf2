"""The Plan tab's handlers as plain functions: what the page shows for given widget values."""

from __future__ import annotations

import json
from dataclasses import fields

import gradio as gr
import pytest

from estimator.config import METHODS, GaLoreConfig, LoRAConfig, TrainSetup
from estimator.estimate import estimate
from estimator.gpus import find_gpu, fit_table, max_batch_size
from estimator.spec import load_spec
from ui.plan import SOURCES, estimate_memory, plan_memory, resolve_model, update_plan

SETUP = {"batch_size": 1, "seq_len": 256, "grad_accum": 1, "dtype": "bf16", "autocast": False,
         "grad_checkpointing": False, "attn_implementation": "sdpa"}


def widget_values(**changes) -> dict:
    values = {f"{m}__{f.name}": f.default for m, cls in METHODS.items() for f in fields(cls)}
    return {**SETUP, **values, **changes}


def plan(methods=("full", "lora", "galore"), preset="llama-7b", sweep="batch size", gpu="RTX 4090", **changes):
    return update_plan(SOURCES[0], preset, "", None, list(methods), sweep, gpu, **widget_values(**changes))


def bar(fig, method: str, category: str) -> float:
    trace = next(t for t in fig.data if t.name == category)
    return trace.y[list(trace.x).index(method)]


def test_one_stacked_bar_per_method_with_the_estimators_numbers():
    breakdown, summary, gpus, sweep, notes = plan()
    est = estimate("llama-7b", LoRAConfig(), TrainSetup())
    assert [t.name for t in breakdown.data][:6] == ["weights", "adapters", "gradients", "optimizer", "activations",
                                                   "transient"]
    assert bar(breakdown, "lora", "weights") == pytest.approx(est.breakdown["weights"] / 2**30)
    assert list(summary["method"]) == ["full", "lora", "galore"]
    assert "llama-7b" in notes and "6.738 B" in notes


def test_changing_a_method_option_changes_its_bar_only():
    before, *_ = plan()
    after, *_ = plan(lora__rank=256)
    assert bar(after, "lora", "adapters") == pytest.approx(32 * bar(before, "lora", "adapters"))
    assert bar(after, "full", "optimizer") == bar(before, "full", "optimizer")


def test_the_gpu_table_marks_fit_and_the_largest_batch():
    *_, gpus, _, _ = plan(methods=("lora",), batch_size=2)
    spec, cfg, setup = load_spec("llama-7b"), LoRAConfig(), TrainSetup(batch_size=2)
    fits = {r["gpu"]: r["fits"] for r in fit_table(estimate(spec, cfg, setup))}
    for row in gpus.to_dict("records"):
        largest = max_batch_size(spec, cfg, setup, find_gpu(row["GPU"]), upper=4096)
        assert row["lora"] == (f"{'✓' if fits[row['GPU']] else '✗'} ≤ {largest}" if largest else "✗")


@pytest.mark.parametrize("axis, values", [("batch size", [1, 2, 4, 8]), ("sequence length", [64, 128, 256]),
                                          ("rank", [1, 2, 4, 8, 16])])
def test_the_sweep_has_a_line_per_method_growing_with_the_setting(axis, values):
    *_, sweep, _ = plan(methods=("full", "lora"), sweep=axis)
    lines = {t.name: t for t in sweep.data if t.name in ("full", "lora")}
    assert list(lines["lora"].x[:len(values)]) == values
    y = [v for v in lines["lora"].y if v is not None]
    assert y == sorted(y) and y[-1] > y[0]
    if axis == "rank":  # full training has no rank
        assert len(set(lines["full"].y)) == 1


def test_a_method_that_cannot_be_estimated_warns_and_the_others_still_show():
    result = plan_memory("tiny-llama-5m", [LoRAConfig(rank=4), GaLoreConfig(rank=1024)], TrainSetup())
    assert list(result["summary"]["method"]) == ["lora"]
    assert "rank=1024" in result["errors"]["galore"] and "rank ≤" in result["errors"]["galore"]
    assert "GaLore not estimated" in result["notes"]


def test_bad_input_is_an_error_message_naming_the_field():
    with pytest.raises(gr.Error, match="rank=0"):
        plan(lora__rank=0)
    with pytest.raises(gr.Error, match="autocast"):
        plan(autocast=True)
    with pytest.raises(gr.Error, match="did you mean llama-7b"):
        update_plan(SOURCES[1], "llama-7b", "llama-7c", None, ["lora"], "batch size", "none", **widget_values())
    with pytest.raises(gr.Error, match="tick at least one"):
        plan(methods=())


def test_an_uploaded_config_json_is_estimated_and_checked(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(load_spec("tiny-llama-5m").config))
    assert resolve_model(SOURCES[2], "llama-7b", "", str(config)) == str(config)
    breakdown, summary, *_ = update_plan(SOURCES[2], "llama-7b", "", str(config), ["lora"], "batch size", "none",
                                         **widget_values())
    assert summary["method"].tolist() == ["lora"]
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"model_type": "llama", "pad": "x" * (1 << 20)}))
    with pytest.raises(ValueError, match="at most 1 MB"):
        resolve_model(SOURCES[2], "", "", str(big))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .json file"):
        resolve_model(SOURCES[2], "", "", str(weights))
    with pytest.raises(ValueError, match="no config.json uploaded"):
        resolve_model(SOURCES[2], "", "", None)
    with pytest.raises(ValueError, match="hub id is empty"):
        resolve_model(SOURCES[1], "", " ", None)


def test_the_api_endpoint_returns_the_estimators_object():
    result = estimate_memory("llama-7b", "galore", {"rank": 1024, "optimizer": "adamw8bit", "layerwise": True},
                             batch_size=1, seq_len=256)
    est = estimate("llama-7b", GaLoreConfig(rank=1024, optimizer="adamw8bit", layerwise=True), TrainSetup())
    assert result["peak_bytes"] == est.peak_bytes and result["breakdown"] == est.breakdown
    assert result["total_bytes"] == est.total_bytes
    assert {g["gpu"] for g in result["gpus"] if g["fits"]} >= {"RTX 4090"}
    with pytest.raises(gr.Error, match="update_proj_gap does not apply to method lora"):
        estimate_memory("llama-7b", "lora", {"update_proj_gap": 10})
    with pytest.raises(gr.Error, match="device="):
        estimate_memory(device="tpu")


def test_switching_to_an_empty_source_waits_for_input_instead_of_failing():
    *charts, notes = update_plan(SOURCES[1], "llama-7b", "", None, ["lora"], "batch size", "none", **widget_values())
    assert "press Enter" in notes and all(isinstance(c, type(gr.skip())) for c in charts)
    *charts, notes = update_plan(SOURCES[2], "llama-7b", "", None, ["lora"], "batch size", "none", **widget_values())
    assert "Upload a config.json" in notes
