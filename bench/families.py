"""Every decoder-only causal-LM family of the installed transformers: the estimate beside the dry run.

Each family's config is shrunk (hidden 512, two layers, eight heads over four KV heads, an
8000-token vocabulary, four experts for MoE families, a 64-token sliding window where the family has one)
and saved to a folder, and then for every method × gradient checkpointing off/on × two shapes
(one below the window, one above it) the estimator's peak is put beside the peak that
`lowrank.dryrun.dry_run` measures on fake tensors, on CPU kernels. A family that transformers
cannot build from a small config, or whose step cannot run on fake tensors, is listed with the
reason.

    python bench/families.py                     # every family: ~4 minutes on two cores
    python bench/families.py --families qwen3,gemma3_text --verbose

Targets (tests/estimator/test_families.py runs the same sweep): the peak within 3%, and every
category holding ≥ 10% of the peak within 5%.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

from estimator.config import FullConfig, GaLoreConfig, LoRAConfig, QGaLoreConfig, QLoRAConfig, TrainSetup

SMALL = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8000, "max_position_embeddings": 1024}
MOE = {"moe_intermediate_size": 256, "shared_expert_intermediate_size": 512, "num_local_experts": 4,
       "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
       "first_k_dense_replace": 1, "decoder_sparse_step": 1, "n_group": 1, "topk_group": 1,
       "kv_lora_rank": 64, "q_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32, "v_head_dim": 64}
WINDOW = 64
METHODS = {
    "full": FullConfig(),
    "lora": LoRAConfig(rank=8),
    "qlora": QLoRAConfig(rank=8),
    "galore": GaLoreConfig(rank=16),
    "qgalore": QGaLoreConfig(rank=16),
}
SHAPES = ((2, 48), (1, 160))  # below and above the sliding window
PEAK_TOLERANCE, CATEGORY_TOLERANCE, CATEGORY_FLOOR = 0.03, 0.05, 0.10


@contextlib.contextmanager
def quiet():
    """transformers' and bitsandbytes' warnings about toy configs, silenced."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def small_config(model_type: str):
    """The family's default config, shrunk; ValueError naming why it cannot be."""
    from transformers import AutoConfig

    from estimator.spec import architecture_problem, config_errors

    try:
        default = AutoConfig.for_model(model_type)
    except (*config_errors(), ImportError) as err:
        raise ValueError(f"no default config ({type(err).__name__})") from None
    problem = architecture_problem(default)
    if problem:
        raise ValueError("not a decoder-only causal LM")
    wanted = {**SMALL, **MOE}
    overrides = {k: v for k, v in wanted.items() if hasattr(default, k) and getattr(default, k) is not None}
    overrides.setdefault("hidden_size", SMALL["hidden_size"])
    overrides.setdefault("num_hidden_layers", SMALL["num_hidden_layers"])
    if getattr(default, "qk_rope_head_dim", None) and "head_dim" in overrides:  # MLA: RoPE spans head_dim
        overrides["head_dim"] = MOE["qk_rope_head_dim"]
    if getattr(default, "sliding_window", None):
        overrides["sliding_window"] = WINDOW
    if isinstance(getattr(default, "layer_types", None), list):  # two layers: one of each of the first two kinds
        kinds = list(dict.fromkeys(default.layer_types))[:2]
        overrides["layer_types"] = (kinds * 2)[:2]
    if hasattr(default, "n_recurrent_layers"):  # a looped model (Dory): one input, one looped, one output layer
        overrides.update(num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1)
        if "layer_types" in overrides:
            overrides["layer_types"] = (overrides["layer_types"] * 2)[:3]
    config = None
    for _ in range(len(overrides) + 1):  # drop the overrides a family refuses, one at a time
        try:
            config = AutoConfig.for_model(model_type, **overrides)
            break
        except (*config_errors(), ImportError) as err:
            bad = next((k for k in overrides if k in str(err)), None)
            if bad is None or bad in ("hidden_size", "num_hidden_layers"):
                raise ValueError(f"cannot shrink its config ({type(err).__name__}: {str(err)[:80]})") from None
            overrides.pop(bad)
    if config is None:
        raise ValueError("cannot shrink its config")
    vocab = config.vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            setattr(config, key, [v if 0 <= v < vocab else 1 for v in value])
        elif isinstance(value, int) and not 0 <= value < vocab:
            setattr(config, key, None if key == "pad_token_id" else 1)
    return config


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@dataclass
class Family:
    model_type: str
    folder: str | None
    problem: str | None = None


def prepare_families(root: str, model_types: list[str] | None = None) -> list[Family]:
    """Each family's small config saved under `root`, or the reason it is left out: no small config,
    not decoder-only, transformers cannot build it, or its step does not run on fake tensors."""
    from estimator.spec import load_spec
    from lowrank.dryrun import dry_run

    out = []
    for model_type in model_types or causal_lm_types():
        try:
            with quiet():
                config = small_config(model_type)
                folder = os.path.join(root, model_type)
                config.save_pretrained(folder)
                load_spec(folder)
                dry_run(folder, FullConfig(), TrainSetup(batch_size=1, seq_len=16), device="cpu")
            out.append(Family(model_type, folder))
        except Exception as err:  # noqa: BLE001 - any failure leaves the family out, with its reason
            out.append(Family(model_type, None, " ".join(f"{type(err).__name__}: {err}".split())[:110]))
    return out


@dataclass
class Row:
    family: str
    method: str
    setting: str
    predicted: int
    measured: int
    peak_error: float
    worst: tuple[str, float]
    failures: list[str]
    seconds: float
    refused: str | None = None  # both sides refuse the setting, with this line


def compare(folder: str, family: str, method: str, batch: int, seq: int, checkpointing: bool) -> Row:
    """Estimate and dry run of one step (CPU kernels), compared."""
    from estimator.estimate import estimate
    from lowrank.dryrun import dry_run
    from lowrank.report import compare_memory

    setup = TrainSetup(batch_size=batch, seq_len=seq, dtype="bf16", grad_checkpointing=checkpointing)
    start = time.perf_counter()
    with quiet():
        predicted = estimate(folder, METHODS[method], setup, device="cpu").to_dict()
        measured = dry_run(folder, METHODS[method], setup, device="cpu").to_dict()
    check = compare_memory(predicted, measured, PEAK_TOLERANCE, CATEGORY_TOLERANCE, CATEGORY_FLOOR)
    worst = max(check.category_errors.items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
    return Row(family, method, f"{batch}×{seq}{' ckpt' if checkpointing else ''}", predicted["peak_bytes"],
               measured["peak_bytes"], check.peak_error, worst, check.failures, time.perf_counter() - start)


def refusal(folder: str, method: str, batch: int, seq: int, checkpointing: bool) -> str | None:
    """The one line both the estimator and the trainer refuse a setting with (a method or a setting
    the family cannot use), or None when the estimator accepts it. A refusal by one side only is
    a failure of the row."""
    from estimator.estimate import estimate
    from lowrank.dryrun import dry_run

    setup = TrainSetup(batch_size=batch, seq_len=seq, dtype="bf16", grad_checkpointing=checkpointing)
    try:
        with quiet():
            estimate(folder, METHODS[method], setup, device="cpu")
        return None
    except ValueError as err:
        reason = str(err)
    try:
        with quiet():
            dry_run(folder, METHODS[method], setup, device="cpu")
    except ValueError as err:
        return reason if "\n" not in reason and "\n" not in str(err) else f"not one line: {reason!r}"
    return f"the estimator refuses ({reason}) but the dry run runs"


def row_for(family: Family, method: str, batch: int, seq: int, checkpointing: bool) -> Row:
    """One setting of one family; a setting both sides refuse is a row with no numbers."""
    setting = f"{batch}×{seq}{' ckpt' if checkpointing else ''}"
    try:
        reason = refusal(family.folder, method, batch, seq, checkpointing)
        if reason is None:
            return compare(family.folder, family.model_type, method, batch, seq, checkpointing)
    except Exception as err:  # noqa: BLE001 - a crash of either side is the row's failure, reported
        return Row(family.model_type, method, setting, 0, 0, 0.0, ("-", 0.0),
                   [f"crashed: {type(err).__name__}: {' '.join(str(err).split())[:120]}"], 0.0)
    if reason.startswith(("the estimator refuses", "not one line")):
        return Row(family.model_type, method, setting, 0, 0, 0.0, ("-", 0.0), [reason], 0.0)
    return Row(family.model_type, method, setting, 0, 0, 0.0, ("-", 0.0), [], 0.0, refused=reason)


def sweep(family: Family) -> list[Row]:
    """Every method × checkpointing × shape."""
    return [row_for(family, method, batch, seq, checkpointing)
            for method in METHODS for checkpointing in (False, True) for batch, seq in SHAPES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", help="comma-separated model types (default: every causal-LM family)")
    parser.add_argument("--verbose", action="store_true", help="one line per method and setting")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        families = prepare_families(root, args.families.split(",") if args.families else None)
        usable = [f for f in families if f.folder]
        print(f"{len(usable)} of {len(families)} causal-LM families build from a small config and run a "
              f"step on fake tensors\n")
        print("| family | rows | worst peak error | worst category error (≥10% of peak) | within targets | s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for family in usable:
            rows = sweep(family)
            done = [r for r in rows if r.predicted]
            refused = [r for r in rows if r.refused]
            worst = max(done, key=lambda r: abs(r.peak_error), default=None)
            worst_cat = max(done, key=lambda r: abs(r.worst[1]), default=None)
            failed = [r for r in rows if r.failures]
            peak = f"{100 * worst.peak_error:+.2f}% ({worst.method}, {worst.setting})" if worst else "-"
            cat = (f"{worst_cat.worst[0]} {100 * worst_cat.worst[1]:+.1f}% ({worst_cat.method})"
                   if worst_cat else "-")
            ok = "✓" if not failed else f"✗ {len(failed)}: " + "; ".join(
                f"{r.method} {r.setting} {', '.join(r.failures)}" for r in failed[:2])
            counted = f"{len(done)}" + (f" (+{len(refused)} refused: {refused[0].refused})" if refused else "")
            print(f"| {family.model_type} | {counted} | {peak} | {cat} | {ok} | "
                  f"{sum(r.seconds for r in rows):.0f} |", flush=True)
            if args.verbose:
                for r in rows:
                    print(f"|   | {r.method} {r.setting} | {100 * r.peak_error:+.2f}% | {r.worst[0]} "
                          f"{100 * r.worst[1]:+.1f}% | {r.refused or ', '.join(r.failures) or '✓'} | "
                          f"{r.seconds:.1f} |")
        left_out = [f for f in families if not f.folder]
        if left_out:
            print("\nLeft out:\n")
            for f in left_out:
                print(f"- {f.model_type}: {f.problem}")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
