"""The `/estimate` API answers every input: arbitrary JSON-like values for every argument and option
give either a result any JSON client reads back exactly (integers within 64 bits, finite numbers)
or a `gr.Error` with a one-line message — never another exception.

In-process (`ui.plan.estimate_memory`, what `gr.api` serves), derandomized, no example database:
the same examples on every run.
"""

from __future__ import annotations

import json
import math

import gradio as gr
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from estimator.config import METHODS, OPTIMIZERS, PROJ_TYPES, QUANT_TYPES, SVD_METHODS, TARGET_SHORTHANDS
from ui.plan import estimate_memory

INT64 = 1 << 63
TOP_LEVEL = ("model", "method", "options", "batch_size", "seq_len", "grad_accum", "dtype", "autocast",
             "grad_checkpointing", "attn_implementation", "device", "loss", "loss_chunk_tokens", "packed")
OPTION_NAMES = sorted({name for cls in METHODS.values() for name in cls.option_names()})
WORDS = sorted({*METHODS, *OPTIMIZERS, *PROJ_TYPES, *QUANT_TYPES, *SVD_METHODS, *TARGET_SHORTHANDS, "q_proj,v_proj",
                "bf16", "fp32", "fp16", "sdpa", "eager", "cuda", "cpu", "yes", "no", "true", "false", "0", "1"})
MODELS = ["tiny-llama-5m", "tiny-llama-20m", "llama-60m", "llama-7b", "llama7b", "org/no-such-model", "",
          "x" * 2000, "/" + "x" * 300, "/no/such/config.json"]
# Values each option takes (a rank too large for a small model included: the model refuses it).
VALID = {"rank": [1, 4, 8, 64, 1024, 65536], "alpha": [1, 16.0, 0.5, 1e6], "dropout": [0.0, 0.1, 0.9],
         "targets": [*TARGET_SHORTHANDS, "q_proj,v_proj", "nope"], "use_rslora": [False, True],
         "optimizer": list(OPTIMIZERS), "quant_type": list(QUANT_TYPES), "double_quant": [False, True],
         "compute_dtype": ["default", "bf16", "fp32", "fp16"], "recipe": ["ours", "peft"], "update_proj_gap": [1, 200, 10**9], "scale": [0.25, 1, 1e6],
         "proj_type": list(PROJ_TYPES), "layerwise": [False, True], "svd": list(SVD_METHODS), "stagger": [False, True],
         "weight_group_size": [16, 256, 65536], "proj_bits": [4, 8, 16], "proj_group_size": [16, 256, 65536],
         "adaptive": [False, True], "cos_threshold": [0, 0.4, 1.0], "queue_size": [1, 5, 1000],
         "modules_to_save": ["", "embed_tokens", "lm_head", "embeddings,lm_head", "nope"]}
SETUP = {"batch_size": [1, 2, 64, 1 << 20], "seq_len": [16, 256, 4096, 1 << 24], "grad_accum": [1, 4, 1 << 20],
         "dtype": ["bf16", "fp32", "fp16"], "autocast": [False, True], "grad_checkpointing": [False, True],
         "attn_implementation": ["sdpa", "eager"], "device": ["cuda", "cpu"], "loss": ["full", "chunked"],
         "loss_chunk_tokens": [1, 256, 1 << 20], "packed": [False, True]}

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(WORDS))
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
# Numbers near every bound the API has: 0, 1, powers of two, 64-bit edges, far beyond.
edge_ints = st.sampled_from([0, 1, 2, 7, 16, 64, 256, 4096, 65536, 65537, 1 << 20, (1 << 20) + 1, 1 << 24,
                             10**9, 10**12, (1 << 63) - 1, 1 << 63, 10**30, -1, -(1 << 63)])
anything = (edge_ints | st.integers(min_value=-10, max_value=5000) | st.floats(allow_nan=True, allow_infinity=True)
            | st.booleans() | st.sampled_from(WORDS) | st.text(max_size=30) | json_like)


@st.composite
def calls(draw) -> dict:
    """A call the API takes (a method, some of its options, a setup), then 0 to 3 of its arguments or
    options replaced by anything at all — so every check, and the estimator behind them, is reached."""
    method = draw(st.sampled_from(list(METHODS)))
    names = draw(st.lists(st.sampled_from(METHODS[method].option_names()), max_size=3, unique=True))
    kwargs = {"model": draw(st.sampled_from(MODELS[:4])), "method": method,
              "options": {name: draw(st.sampled_from(VALID[name])) for name in names},
              **{name: draw(st.sampled_from(values)) for name, values in SETUP.items() if draw(st.booleans())}}
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        where = draw(st.sampled_from([*TOP_LEVEL, "an option", "an option"]))
        if where == "an option" and isinstance(kwargs["options"], dict):
            name = draw(st.sampled_from([*OPTION_NAMES, "method"]) | st.text(max_size=8))
            kwargs["options"][name] = draw(anything)
        elif where == "model":
            kwargs["model"] = draw(st.sampled_from(MODELS) | st.text(max_size=40) | json_like)
        elif where != "an option":
            kwargs[where] = draw(anything)
    return kwargs


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Hub-looking ids fail fast (no network) and the result does not depend on the network."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def assert_readable(value, path: str = "result") -> None:
    """Only what every JSON client reads back exactly: 64-bit integers, finite floats, strings, bools, null."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path} has a non-string key {key!r}"
            assert_readable(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_readable(item, f"{path}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool):
        assert -INT64 <= value < INT64, f"{path}={value} does not fit 64 bits"
    elif isinstance(value, float):
        assert math.isfinite(value), f"{path}={value} is not finite"
    else:
        assert value is None or isinstance(value, (str, bool)), f"{path} is a {type(value).__name__}"


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls())
@example({"model": "llama-7b", "method": "lora", "options": {}, "batch_size": 1 << 20, "seq_len": 1 << 24})
@example({"model": "llama-7b", "method": "qlora", "options": {"double_quant": "no"}, "batch_size": 10**12})
@example({"model": "x" * 5000, "method": ["lora"], "options": "rank=8"})
def test_every_input_is_answered_with_a_result_or_one_line(kwargs):
    try:
        result = estimate_memory(**kwargs)
    except gr.Error as err:
        message = err.message
        assert isinstance(message, str) and message.strip(), kwargs
        assert len(message.splitlines()) == 1, message
        for python in ("Traceback", "unhashable", "got multiple values", "argument after", "object is not"):
            assert python not in message, message
        return
    assert_readable(result)
    assert result["peak_bytes"] > 0 and result["total_bytes"] >= result["peak_bytes"]
    json.dumps(result, allow_nan=False)
    orjson.dumps(result)  # what Gradio's server encodes with: it refuses integers beyond 64 bits


def test_the_fuzzed_inputs_reach_the_estimator():
    """The strategies are not all junk: a plain call of each method succeeds (so the property above
    covers results as well as errors)."""
    for method in METHODS:
        assert_readable(estimate_memory("tiny-llama-5m", method, {}, batch_size=2, seq_len=64))
