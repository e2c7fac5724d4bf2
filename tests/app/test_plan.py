"""The Plan tab's handlers as plain functions: what the page shows for given widget values."""

from __future__ import annotations

import json
from dataclasses import fields

import gradio as gr
import pytest

from estimator.config import METHODS, FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, TrainSetup
from estimator.estimate import estimate
from estimator.gpus import find_gpu, fit_table, max_batch_size
from estimator.spec import load_spec
from ui.charts import fmt_bytes
from ui.plan import (
    SOURCES,
    SUMMARY_COLUMNS,
    create_plan_tab,
    estimate_memory,
    plan_memory,
    resolve_model,
    update_plan,
)
from ui.widgets import METHOD_LABELS

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
    assert list(summary["method"]) == ["Full training", "LoRA", "GaLore"]
    assert "llama-7b" in notes and "6.738 B" in notes


def test_the_page_names_methods_by_their_labels_not_their_keys():
    breakdown, summary, gpus, sweep, _ = plan(methods=("lora", "qgalore"))
    axis = breakdown.layout.xaxis
    assert list(axis.tickvals) == ["lora", "qgalore"] and list(axis.ticktext) == ["LoRA", "Q-GaLore"]
    assert all(list(t.customdata) == ["LoRA", "Q-GaLore"] for t in breakdown.data if t.type == "bar")
    assert list(summary["method"]) == ["LoRA", "Q-GaLore"] and tuple(summary.columns) == SUMMARY_COLUMNS
    assert list(gpus.columns) == ["GPU", "memory", "LoRA", "Q-GaLore"]
    assert {t.name for t in sweep.data} >= {"LoRA", "Q-GaLore"}
    text = json.dumps([*summary.to_dict("records"), *gpus.columns])
    assert "qgalore" not in text and "lora" not in text


def test_small_models_are_counted_in_millions():
    *_, notes = plan(preset="llama-60m", methods=("lora",))
    assert "**llama-60m** (llama): 58.1 M parameters" in notes and " B parameters" not in notes


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
        assert row["LoRA"] == (f"{'✓' if fits[row['GPU']] else '✗'} ≤ {largest}" if largest else "✗")


@pytest.mark.parametrize("axis, values", [("batch size", [1, 2, 4, 8]), ("sequence length", [64, 128, 256]),
                                          ("rank", [1, 2, 4, 8, 16])])
def test_the_sweep_has_a_line_per_method_growing_with_the_setting(axis, values):
    *_, sweep, _ = plan(methods=("full", "lora"), sweep=axis)
    lines = {t.name: t for t in sweep.data if t.name in ("Full training", "LoRA")}
    assert list(lines["LoRA"].x[:len(values)]) == values
    y = [v for v in lines["LoRA"].y if v is not None]
    assert y == sorted(y) and y[-1] > y[0]
    if axis == "rank":  # full training has no rank
        assert len(set(lines["Full training"].y)) == 1


def test_the_sweep_over_the_loss_chunk_draws_each_methods_full_loss_beside_it():
    *_, sweep, _ = plan(methods=("lora",), preset="llama3.1-8b", sweep="loss chunk tokens", seq_len=2048)
    lines = {t.name: t for t in sweep.data}
    chunked, full = lines["LoRA"], lines["LoRA, full loss"]
    assert list(chunked.x[:3]) == [16, 32, 64] and len(set(full.y)) == 1
    assert list(chunked.y) == sorted(chunked.y) and chunked.y[-1] < full.y[0]  # 128k vocabulary: always below


def test_packed_batches_draw_the_padded_ones_beside_them():
    *_, sweep, _ = plan(methods=("lora",), preset="tiny-llama-20m", packed=True)
    lines = {t.name: t for t in sweep.data}
    packed, padded = lines["LoRA"], lines["LoRA, padded"]
    *_, plain, _ = plan(methods=("lora",), preset="tiny-llama-20m", padded=True)
    assert list(padded.y) == list({t.name: t for t in plain.data}["LoRA"].y)  # the same sweep, other batches
    assert list(packed.y) != list(padded.y)
    *_, plain, _ = plan(methods=("lora",), preset="tiny-llama-20m")
    assert [t.name for t in plain.data if t.name.startswith("LoRA")] == ["LoRA"]  # plain rows: nothing beside


@pytest.mark.parametrize("method, saved", [("lora", "embed_tokens,lm_head"), ("qlora", "lm_head")])
@pytest.mark.parametrize("axis", ["batch size", "loss chunk tokens"])
def test_modules_to_save_draws_the_adapters_alone_beside_the_method(method, saved, axis):
    """What training the embeddings / lm_head costs across the sweep: the method's line beside the
    same method without modules_to_save (its own plain sweep), above it at every point."""
    label = METHOD_LABELS[method]
    *_, sweep, notes = plan(methods=("full", method), sweep=axis, **{f"{method}__modules_to_save": saved})
    lines = {t.name: t for t in sweep.data}
    *_, plain, plain_notes = plan(methods=("full", method), sweep=axis)
    assert list(lines[f"{label}, adapters only"].y) == list({t.name: t for t in plain.data}[label].y)
    assert all(a > b for a, b in zip(lines[label].y, lines[f"{label}, adapters only"].y))
    assert "Full training, adapters only" not in lines  # full training has no modules_to_save
    assert f"{label}, adapters only" not in {t.name for t in plain.data}
    assert "in full adds" in notes and "in full adds" not in plain_notes


def test_the_notes_say_what_modules_to_save_adds_at_this_point():
    saved, plain = LoRAConfig(modules_to_save="embed_tokens,lm_head"), LoRAConfig()
    setup = TrainSetup(batch_size=4, seq_len=512)
    with_copies, adapters = (estimate("llama-7b", cfg, setup).total_bytes for cfg in (saved, plain))
    notes = plan_memory("llama-7b", [FullConfig(), saved], setup)["notes"]
    assert (f"- LoRA: training embed_tokens,lm_head in full adds {fmt_bytes(with_copies - adapters)} "
            f"({fmt_bytes(adapters)} with adapters only → {fmt_bytes(with_copies)}") in notes
    assert with_copies - adapters > 2 * 2 * 32000 * 4096 * 2  # two bf16 copies, their gradients and more
    assert notes.count("in full adds") == 1


def test_a_method_that_cannot_be_estimated_warns_and_the_others_still_show():
    result = plan_memory("tiny-llama-5m", [LoRAConfig(rank=4), GaLoreConfig(rank=1024)], TrainSetup())
    assert list(result["summary"]["method"]) == ["LoRA"]
    assert "rank=1024" in result["errors"]["galore"] and "rank ≤" in result["errors"]["galore"]
    assert "GaLore not estimated" in result["notes"]


def cleared(outputs) -> bool:
    """No number of any model on the page: empty charts (a message instead) and empty tables."""
    breakdown, summary, gpus, sweep, _ = outputs
    return not breakdown.data and not sweep.data and summary.empty and gpus.empty \
        and breakdown.layout.annotations and sweep.layout.annotations


@pytest.mark.parametrize("change, message", [
    (dict(lora__rank=0), "rank=0"),
    (dict(autocast=True), "autocast"),
    (dict(methods=()), "tick at least one"),
    (dict(qgalore__weight_group_size=7, methods=("qgalore",)), "weight_group_size=7 must be a power of two"),
])
def test_bad_input_clears_the_page_and_names_the_field(change, message):
    methods = change.pop("methods", ("lora",))
    with pytest.warns(UserWarning, match=message):
        outputs = plan(methods=methods, **change)
    assert cleared(outputs)
    notes = outputs[-1]
    assert notes.startswith("**Cannot estimate**") and message in notes and "\n" not in notes


def test_an_error_after_a_result_leaves_nothing_of_the_previous_model():
    """The page after an unknown hub id: no chart or table of the preset shown before, and the notes
    say why — never the previous model's numbers without a model line."""
    *_, notes = plan()
    assert "llama-7b" in notes
    with pytest.warns(UserWarning, match="did you mean llama-7b"):
        outputs = update_plan(SOURCES[1], "llama-7b", "llama-7c", None, ["lora"], "batch size", "none",
                              **widget_values())
    assert cleared(outputs) and "did you mean llama-7b" in outputs[-1] and "**llama-7b**" not in outputs[-1]


def test_an_uploaded_config_json_is_estimated_and_checked(tmp_path):
    upload = tmp_path / ("f" * 64)  # Gradio keeps an upload in a folder named by its hash
    upload.mkdir()
    config = upload / "config.json"
    config.write_text(json.dumps(load_spec("tiny-llama-5m").config))
    assert resolve_model(SOURCES[2], "llama-7b", "", str(config)) == str(config)
    breakdown, summary, *_, notes = update_plan(SOURCES[2], "llama-7b", "", str(config), ["lora"], "batch size",
                                                "none", **widget_values())
    assert summary["method"].tolist() == ["LoRA"]
    assert notes.startswith("**uploaded config.json** (llama)") and "f" * 64 not in notes
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
    with pytest.raises(ValueError, match="hub id or local path is empty"):
        resolve_model(SOURCES[1], "", " ", None)


@pytest.mark.parametrize("content, message", [
    ("{oops", "the uploaded config.json is not valid JSON"),
    ('{"model_type": "llama", "num_hidden_layers": 20000}', "num_hidden_layers=20000 must be a whole number"),
    ('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}', "transformers cannot read"),
])
def test_a_malformed_upload_is_named_by_the_upload_not_the_servers_path(tmp_path, content, message):
    folder = tmp_path / ("e" * 64)
    folder.mkdir()
    config = folder / "config.json"
    config.write_text(content)
    with pytest.warns(UserWarning):
        outputs = update_plan(SOURCES[2], "llama-7b", "", str(config), ["lora"], "batch size", "none",
                              **widget_values())
    notes = outputs[-1]
    assert cleared(outputs) and message in notes
    assert str(tmp_path) not in notes and "e" * 64 not in notes


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


@pytest.mark.parametrize("kwargs, message", [
    # the tester's wrong successes: flags as strings, numbers no GPU or kernel takes
    (dict(method="qlora", options={"double_quant": "no"}), "double_quant='no' must be true or false"),
    (dict(method="qgalore", options={"adaptive": "no"}), "adaptive='no' must be true or false"),
    (dict(method="lora", options={"use_rslora": "yes"}), "use_rslora='yes' must be true or false"),
    (dict(method="galore", options={"stagger": 2}), "stagger=2 must be true or false"),
    (dict(method="qgalore", options={"weight_group_size": 7}), "weight_group_size=7 must be a power of two"),
    (dict(method="qgalore", options={"proj_group_size": 10**12}), "proj_group_size=1000000000000 must be"),
    (dict(method="lora", options={"alpha": 1e308}), "alpha=1e+308 must be a number > 0 and ≤ 1,000,000"),
    (dict(batch_size=10**12), "batch_size=1000000000000 must be a whole number ≤ 1,048,576"),
    (dict(batch_size=True), "batch_size=True must be a whole number"),
    (dict(grad_checkpointing="no"), "grad_checkpointing='no' must be true or false"),
    # the tester's Python errors: now the API's own words
    (dict(method=["lora"]), "method=['lora'] must be one of full, lora"),
    (dict(options={"method": "lora"}), "options must not hold method"),
    (dict(options="rank=8"), "options='rank=8' must be an object of option names and values"),
    (dict(model=["llama-7b"]), "model=['llama-7b'] must be a string"),
    (dict(model="x" * 5000), "is 5,000 characters long"),
    (dict(model="/" + "x" * 300), "File name too long"),
    (dict(batch_size=1 << 20, seq_len=1 << 24, attn_implementation="eager"), "beyond what 64 bits hold"),
])
def test_the_api_refuses_bad_input_in_its_own_words(kwargs, message):
    with pytest.raises(gr.Error) as err:
        estimate_memory(**kwargs)
    text = err.value.message
    assert message in text and "\n" not in text
    for python in ("unhashable", "got multiple values", "argument after **", "Traceback"):
        assert python not in text


def test_qgalore_group_sizes_follow_the_quantizer():
    assert QGaLoreConfig(weight_group_size=64, proj_group_size=1024).weight_group_size == 64
    result = estimate_memory("tiny-llama-5m", "qgalore", {"rank": 8, "weight_group_size": 64})
    assert result["options"]["weight_group_size"] == 64


def test_switching_to_an_empty_source_clears_the_page_and_asks_for_input():
    outputs = update_plan(SOURCES[1], "llama-7b", "", None, ["lora"], "batch size", "none", **widget_values())
    assert cleared(outputs) and "press Enter" in outputs[-1]
    outputs = update_plan(SOURCES[2], "llama-7b", "", None, ["lora"], "batch size", "none", **widget_values())
    assert cleared(outputs) and "Upload a config.json" in outputs[-1]


def test_the_source_radio_and_the_path_box_say_the_same_thing():
    with gr.Blocks() as demo:
        create_plan_tab(demo)
    radio = next(b for b in demo.blocks.values() if isinstance(b, gr.Radio) and SOURCES[0] in
                 [c[1] for c in b.choices])
    box = next(b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and "hub id" in (b.label or ""))
    assert box.label in [c[0] for c in radio.choices] and "folder" not in box.label
    tables = [b for b in demo.blocks.values() if isinstance(b, gr.DataFrame)]
    assert len(tables) == 2 and not any(t.wrap for t in tables)  # headers on one line, never cut mid-word
    assert set(METHOD_LABELS) == set(METHODS)
