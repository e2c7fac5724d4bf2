"""Method option widgets: every dataclass field has one, and their values come back as the same dataclasses."""

from __future__ import annotations

from dataclasses import fields

import pytest

from estimator.config import METHODS, GaLoreConfig, LoRAConfig, QGaLoreConfig, TrainSetup
from ui.widgets import FIELD_WIDGETS, method_configs, option_flag, option_help, option_label, train_setup


def defaults() -> dict:
    return {f"{m}__{f.name}": f.default for m, cls in METHODS.items() for f in fields(cls)}


def test_every_option_of_every_method_has_a_bounded_widget_and_a_help_text():
    for method, cls in METHODS.items():
        for f in fields(cls):
            assert f.name in FIELD_WIDGETS, f"{method}.{f.name} has no widget"
            assert option_help(method, f.name), f"{method}.{f.name} has no help text"


def test_default_widget_values_give_the_default_dataclasses():
    configs = method_configs(list(METHODS), defaults())
    assert configs == [cls() for cls in METHODS.values()]


def test_slider_floats_become_the_field_types():
    values = {**defaults(), "lora__rank": 16.0, "lora__alpha": 32, "galore__update_proj_gap": 50.0}
    lora, galore = method_configs(["lora", "galore"], values)
    assert lora == LoRAConfig(rank=16, alpha=32.0)
    assert isinstance(lora.rank, int) and isinstance(lora.alpha, float)
    assert galore == GaLoreConfig(update_proj_gap=50)


def test_each_tab_keeps_its_own_defaults(tmp_path):
    """Each tab builds its own widgets: the Train tab's shorter refresh gap is not the Plan tab's,
    and every tab's Q-GaLore widgets start at Q-GaLore's own defaults (8-bit Adam, layer-wise)."""
    import app

    demo = app.build_ui(tmp_path)
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    gaps = {tab: by_id[f"{tab}-galore-update_proj_gap"] for tab in ("plan", "train", "dryrun")}
    assert len({id(widget) for widget in gaps.values()}) == 3  # three widgets, not one shared
    assert {tab: w.value for tab, w in gaps.items()} == {"plan": 200, "train": 25, "dryrun": 200}
    for tab in ("plan", "train", "dryrun"):
        q = {name: by_id[f"{tab}-qgalore-{name}"].value for name in ("optimizer", "layerwise", "update_proj_gap")}
        assert q["optimizer"] == QGaLoreConfig().optimizer == "adamw8bit" and q["layerwise"] is True
        assert q["update_proj_gap"] == (25 if tab == "train" else QGaLoreConfig().update_proj_gap)


@pytest.mark.parametrize("change, words", [
    ({"lora__rank": 2.5}, ["LoRA", "rank=2.5"]),
    ({"lora__dropout": 1.0}, ["LoRA", "dropout"]),
    ({"lora__targets": "  "}, ["LoRA", "targets"]),
])
def test_a_bad_value_names_the_method_and_the_field(change, words):
    with pytest.raises(ValueError) as err:
        method_configs(["lora"], {**defaults(), **change})
    assert all(w in str(err.value) for w in words)


def test_no_method_chosen_is_an_error_that_says_what_to_do():
    with pytest.raises(ValueError, match="tick at least one"):
        method_configs([], defaults())


def test_setup_from_widget_values():
    assert train_setup(4.0, 512.0, 2.0, "fp32", True, True, "eager") == TrainSetup(
        batch_size=4, seq_len=512, grad_accum=2, dtype="fp32", autocast=True, grad_checkpointing=True,
        attn_implementation="eager")
    with pytest.raises(ValueError, match="autocast"):
        train_setup(1, 256, 1, "bf16", True, False, "sdpa")


def test_option_widgets_have_readable_labels_and_keep_their_ids(tmp_path):
    """Labels are words, not command-line flags (the flag stays in the help text); every widget keeps
    its HTML id "<tab>-<method>-<field>"."""
    import app

    demo = app.build_ui(tmp_path)
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    for tab in ("plan", "train", "dryrun"):
        for method, cls in METHODS.items():
            labels = []
            for f in fields(cls):
                widget = by_id[f"{tab}-{method}-{f.name}"]
                flag = option_flag(method, f.name)
                assert widget.label == option_label(f.name) and (widget.label != flag or flag == f.name)
                assert f"--{flag}" in widget.info and option_help(method, f.name) in widget.info
                labels.append(widget.label)
            assert len(set(labels)) == len(labels), labels
    assert by_id["train-lora-alpha"].label == "LoRA alpha"
    assert by_id["plan-qgalore-update_proj_gap"].label == "refresh gap (update_proj_gap)"


def test_long_ranges_are_number_inputs_with_bounds(tmp_path):
    """A slider over thousands of values cannot be aimed and its ends get cut off: steps, ranks and
    refresh gaps are number inputs, bounded like the sliders were."""
    import gradio as gr

    import app

    demo = app.build_ui(tmp_path)
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    ids = ["train-steps", "train-eval-every", "demo-pretrain-steps", "demo-finetune-steps",
           *(f"{tab}-{m}-{name}" for tab in ("plan", "train", "dryrun") for m in ("lora", "qlora", "galore", "qgalore")
             for name in ("rank",)),
           *(f"{tab}-{m}-update_proj_gap" for tab in ("plan", "train", "dryrun") for m in ("galore", "qgalore"))]
    for elem_id in ids:
        widget = by_id[elem_id]
        assert isinstance(widget, gr.Number) and widget.precision == 0, elem_id
        assert widget.minimum is not None and widget.maximum is not None and widget.minimum <= widget.value, elem_id
    assert by_id["train-steps"].value == 100 and by_id["train-lora-rank"].maximum >= 4096
    for block in demo.blocks.values():  # the sliders left have a few hundred positions at most, or are short
        if isinstance(block, gr.Slider):
            assert (block.maximum - block.minimum) / block.step <= 2048, block.label


def test_the_loss_is_a_setup_widget_beside_the_batch():
    import gradio as gr

    from ui.widgets import setup_widgets, split_setup

    with gr.Blocks():
        widgets = setup_widgets(prefix="t")
    assert list(widgets)[:5] == ["batch_size", "seq_len", "grad_accum", "loss", "loss_chunk_tokens"]
    assert widgets["loss"].elem_id == "t-loss"
    values = {"batch_size": 2.0, "seq_len": 64.0, "grad_accum": 1.0, "dtype": "bf16", "autocast": False,
              "grad_checkpointing": False, "attn_implementation": "sdpa", "loss": "chunked", "loss_chunk_tokens": 128.0}
    setup, _ = split_setup(values)
    assert setup == TrainSetup(batch_size=2, seq_len=64, loss="chunked", loss_chunk_tokens=128)
    with pytest.raises(ValueError, match="loss_chunk_tokens=0"):
        train_setup(1, 256, 1, "bf16", False, False, "sdpa", loss="chunked", loss_chunk_tokens=0)
