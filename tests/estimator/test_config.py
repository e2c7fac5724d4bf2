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
    check_json_numbers,
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


@pytest.mark.parametrize("make, message", [
    # a flag is a real bool: not a string, not 1 or 2
    (lambda: QLoRAConfig(double_quant="no"), "double_quant='no' must be true or false"),
    (lambda: QGaLoreConfig(adaptive="no"), "adaptive='no' must be true or false"),
    (lambda: LoRAConfig(use_rslora="yes"), "use_rslora='yes' must be true or false"),
    (lambda: GaLoreConfig(stagger=2), "stagger=2 must be true or false"),
    (lambda: GaLoreConfig(layerwise=1), "layerwise=1 must be true or false"),
    (lambda: TrainSetup(grad_checkpointing="false"), "grad_checkpointing='false' must be true or false"),
    # a whole number is an int: not a bool, not a float
    (lambda: TrainSetup(batch_size=True), "batch_size=True must be a whole number ≥ 1"),
    (lambda: TrainSetup(batch_size=2.0), "batch_size=2.0 must be a whole number written without a decimal point"),
    (lambda: LoRAConfig(rank="8"), "rank='8' must be a whole number ≥ 1"),
    (lambda: QGaLoreConfig(proj_bits=4.0), "proj_bits=4.0 must be 4, 8 or 16"),
    # bounds no GPU or kernel goes past
    (lambda: TrainSetup(batch_size=10**12), "batch_size=1000000000000 must be a whole number ≤ 1,048,576; lower it"),
    (lambda: TrainSetup(seq_len=1 << 25), "seq_len=33554432 must be a whole number ≤ 16,777,216"),
    (lambda: TrainSetup(grad_accum=10**7), "grad_accum=10000000 must be a whole number ≤ 1,048,576"),
    (lambda: LoRAConfig(rank=65537), "rank=65537 must be a whole number ≤ 65,536"),
    (lambda: GaLoreConfig(update_proj_gap=10**10), "update_proj_gap=10000000000 must be a whole number ≤"),
    (lambda: QGaLoreConfig(queue_size=1001), "queue_size=1001 must be a whole number ≤ 1,000"),
    (lambda: QGaLoreConfig(weight_group_size=7), "weight_group_size=7 must be a power of two from 16 to 65,536"),
    (lambda: QGaLoreConfig(proj_group_size=10**12), "proj_group_size=1000000000000 must be a power of two"),
    (lambda: QGaLoreConfig(proj_group_size=1 << 17), "proj_group_size=131072 must be a power of two"),
    # numbers are finite and sane
    (lambda: LoRAConfig(alpha=1e308), "alpha=1e+308 must be a number > 0 and ≤ 1,000,000"),
    (lambda: LoRAConfig(alpha=float("nan")), "alpha=nan must be a number > 0"),
    (lambda: GaLoreConfig(scale=float("inf")), "scale=inf must be a number > 0"),
    (lambda: LoRAConfig(dropout=True), "dropout=True must be in [0, 1)"),
    (lambda: QGaLoreConfig(cos_threshold=float("nan")), "cos_threshold=nan must be in [0, 1]"),
    # strings are strings, and short
    (lambda: TrainSetup(dtype=["bf16"]), "dtype=['bf16'] is not one of fp32, bf16, fp16"),
    (lambda: LoRAConfig(targets="q" * 2000), "must be attention, mlp, all-linear or module names"),
    (lambda: TrainSetup(batch_size=10**5000), "batch_size=<a int too large to show> must be a whole number ≤"),
])
def test_types_and_bounds_are_strict_and_named(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_long_values_are_cut_in_messages():
    with pytest.raises(ValueError) as err:
        TrainSetup(dtype="x" * 5000)
    assert len(str(err.value)) < 200 and "…" in str(err.value)


def test_generous_bounds_take_every_real_setting():
    TrainSetup(batch_size=1 << 20, seq_len=1 << 24, grad_accum=1 << 20, dtype="fp32", autocast=True)
    LoRAConfig(rank=65536, alpha=1e6, dropout=0.99, use_rslora=True)
    QGaLoreConfig(rank=4096, update_proj_gap=10**9, scale=1e6, weight_group_size=16, proj_group_size=65536,
                  proj_bits=8, queue_size=1000, cos_threshold=1, stagger=True, adaptive=False)
    assert LoRAConfig(alpha=16).alpha == 16  # an int is a number too


def test_method_config_names_its_own_misuse():
    with pytest.raises(ValueError, match=r"method=\['lora'\] is not one of"):
        method_config(["lora"])
    with pytest.raises(ValueError, match="method is not an option"):
        method_config("lora", method="lora")


def test_json_numbers_are_checked_to_64_bits():
    check_json_numbers({"a": [1, 2.5, True, None, "x"], "b": {"c": (1 << 63) - 1}})
    with pytest.raises(ValueError, match=r"beyond what 64 bits hold \(b.c = about 2\^63\)"):
        check_json_numbers({"b": {"c": 1 << 63}})
    with pytest.raises(ValueError, match="not a finite number"):
        check_json_numbers({"x": [float("inf")]})


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


def test_a_target_list_may_mix_shorthands_and_names():
    """"all-linear,lm_head" is every block linear plus lm_head, not lm_head alone; the trainer's LoRA
    wraps what the estimator counts."""
    import torch
    from transformers import AutoModelForCausalLM

    from estimator.estimate import estimate
    from estimator.spec import load_config
    from estimator.targets import selects
    from lowrank.lora import apply_lora

    assert selects("q_proj", "attention", "all-linear,lm_head") and selects("down_proj", "mlp", "attention,mlp")
    assert selects("gate_proj", "mlp", "attention,gate_proj") and not selects("up_proj", "mlp", "attention,gate_proj")
    setup = TrainSetup(batch_size=1, seq_len=16)
    mixed, listed = (LoRAConfig(rank=4, targets=t) for t in
                     ("all-linear,lm_head", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"))
    assert estimate("tiny-llama-5m", mixed, setup).params_trainable == estimate("tiny-llama-5m", listed, setup).params_trainable
    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(load_config("tiny-llama-5m")), mixed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == estimate("tiny-llama-5m", mixed, setup).params_trainable
