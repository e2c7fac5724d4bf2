"""The method dataclasses validate on construction and name the field, the value and the fix."""

from __future__ import annotations

import pytest

from estimator.config import (
    METHODS,
    FullConfig,
    GaLoreConfig,
    LoRAConfig,
    QGaLoreConfig,
    QLoRAConfig,
    TrainSetup,
    method_config,
    parse_targets,
)


def test_defaults_are_valid():
    TrainSetup()
    for cls in METHODS.values():
        cls()


@pytest.mark.parametrize("make,field", [
    (lambda: TrainSetup(batch_size=0), "batch_size=0"),
    (lambda: TrainSetup(seq_len=-5), "seq_len=-5"),
    (lambda: TrainSetup(dtype="fp8"), "dtype='fp8'"),
    (lambda: TrainSetup(autocast=True, dtype="bf16"), "autocast=True needs dtype='fp32'"),
    (lambda: TrainSetup(attn_implementation="flash"), "attn_implementation='flash'"),
    (lambda: LoRAConfig(rank=0), "rank=0"),
    (lambda: LoRAConfig(alpha=-1), "alpha=-1"),
    (lambda: LoRAConfig(dropout=1.0), "dropout=1.0"),
    (lambda: LoRAConfig(targets=""), "targets=''"),
    (lambda: QLoRAConfig(quant_type="int4"), "quant_type='int4'"),
    (lambda: GaLoreConfig(update_proj_gap=0), "update_proj_gap=0"),
    (lambda: GaLoreConfig(optimizer="sgd"), "optimizer='sgd'"),
    (lambda: GaLoreConfig(proj_type="diagonal"), "proj_type='diagonal'"),
    (lambda: QGaLoreConfig(proj_bits=3), "proj_bits=3"),
    (lambda: FullConfig(optimizer="lion"), "optimizer='lion'"),
])
def test_invalid_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        TrainSetup(batch_size=0, seq_len=0)
    assert "batch_size" in str(err.value) and "seq_len" in str(err.value)


def test_option_of_another_method_is_refused_with_its_owners():
    with pytest.raises(ValueError, match="rank does not apply to method full.*lora"):
        method_config("full", rank=8)
    with pytest.raises(ValueError, match="method='dora'"):
        method_config("dora")


def test_subclasses_share_their_parents_options():
    assert set(LoRAConfig.option_names()) < set(QLoRAConfig.option_names())
    assert set(GaLoreConfig.option_names()) < set(QGaLoreConfig.option_names())
    assert QGaLoreConfig().layerwise and QGaLoreConfig().optimizer == "adamw8bit"


def test_scaling_follows_the_paper():
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0
    assert LoRAConfig(rank=16, alpha=16, use_rslora=True).scaling == 4.0


def test_targets_parse():
    assert parse_targets("attention") == ("attention",)
    assert parse_targets(" q_proj, v_proj ") == ("q_proj", "v_proj")
