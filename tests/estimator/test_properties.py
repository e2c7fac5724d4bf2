"""Whatever the inputs, the estimator answers or raises ValueError — nothing else escapes."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estimator.config import METHODS, TrainSetup, method_config
from estimator.estimate import estimate
from estimator.spec import load_spec

ANY = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=12), st.sampled_from(["attention", "mlp", "all-linear", "q_proj,v_proj", "nf4",
                                                        "bf16", "fp32", "adamw8bit", "sgd", "eager", "std", "exact"]))
FIELDS = sorted({name for cls in METHODS.values() for name in cls.option_names()})
SETUP_FIELDS = ["batch_size", "seq_len", "grad_accum", "dtype", "autocast", "grad_checkpointing", "attn_implementation"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(METHODS)), options=st.dictionaries(st.sampled_from(FIELDS), ANY, max_size=4),
       setup=st.dictionaries(st.sampled_from(SETUP_FIELDS), ANY, max_size=3),
       model=st.sampled_from(["tiny-llama-5m", "gpt2", "qwen2.5-0.5b", "gemma-7b", "llama-7b"]))
def test_only_value_errors_escape(method, options, setup, model):
    try:
        result = estimate(load_spec(model), method_config(method, **options), TrainSetup(**setup))
    except ValueError:
        return
    assert result.peak_bytes > 0 and all(v >= 0 for v in result.breakdown.values())


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 64), seq=st.integers(1, 4096), rank=st.integers(1, 512))
def test_memory_grows_with_batch_and_sequence(batch, seq, rank):
    spec = load_spec("llama-130m")
    method = method_config("lora", rank=rank)
    base = estimate(spec, method, TrainSetup(batch_size=batch, seq_len=seq)).peak_bytes
    assert estimate(spec, method, TrainSetup(batch_size=batch + 1, seq_len=seq)).peak_bytes >= base
    assert estimate(spec, method, TrainSetup(batch_size=batch, seq_len=seq + 1)).peak_bytes >= base


@settings(max_examples=50, deadline=None)
@given(source=st.text(max_size=40))
def test_any_model_string_is_a_value_error_or_a_spec(source):
    with contextlib.suppress(ValueError):  # any other exception fails the test
        load_spec(source)
