"""`python -m estimator` answers every command line: generated argv (real flags, junk values, junk
flags, models that are no model) either prints a valid estimate and returns 0, or exits with status 2
and one line on stderr — never a traceback or another exception.

In-process (`estimator.cli.main(argv)`), derandomized, no example database.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from estimator.cli import main
from estimator.config import METHODS
from estimator.options import METHOD_OPTIONS, SETUP_OPTIONS

INT64 = 1 << 63
VALUE_FLAGS = [o.flag for o in (*METHOD_OPTIONS, *SETUP_OPTIONS) if o.type is not bool] + \
    ["--method", "--device", "--max-batch-size"]
SWITCHES = [o.flag for o in (*METHOD_OPTIONS, *SETUP_OPTIONS) if o.type is bool] + \
    ["--no-" + o.flag[2:] for o in (*METHOD_OPTIONS, *SETUP_OPTIONS) if o.type is bool] + ["--json", "--fit-table"]
VALUES = [*METHODS, "adamw", "adamw8bit", "sgd", "nf4", "bf16", "fp32", "eager", "sdpa", "cpu", "cuda", "attention",
          "all-linear", "q_proj,v_proj", "std", "exact", "RTX 4090", "h100 80gb", "gtx 480",
          "0", "1", "2", "7", "8", "16", "64", "256", "1024", "65536", "65537", "1048576", "1048577", "16777216",
          "1e9", "0.5", "1e308", "-1", "nan", "inf", "-inf", "1" * 30, "", " ", "yes", "no", "-", "--"]
MODELS = ["tiny-llama-5m", "tiny-llama-20m", "llama-7b", "llama7b", "org/no-such-model", "x" * 5000,
          "/" + "x" * 300, "/no/such/config.json", ""]

TAKES = {int: ["1", "2", "8", "16", "64", "256", "1024"], float: ["0", "0.05", "0.5", "1", "16"],
         str: ["attention", "mlp", "all-linear", "q_proj,v_proj"]}
EXTRAS = [["--json"], ["--fit-table"], ["--device", "cpu"], ["--max-batch-size", "RTX 4090"],
          ["--max-batch-size", "h100 80gb"]]

junk = st.text(max_size=12)
anything = st.sampled_from(VALUES) | junk


def takes(option) -> st.SearchStrategy[str]:
    """A value the option accepts (the dataclass may still refuse a combination)."""
    return st.sampled_from([str(c) for c in option.choices] if option.choices else TAKES[option.type])


@st.composite
def argvs(draw) -> list[str]:
    """A command line that runs (a model, a method, some of its flags, --json/--fit-table/...), then 0 to 3
    of its words replaced by, or followed by, anything: real flags, junk values, junk flags."""
    method = draw(st.sampled_from(list(METHODS)))
    argv = [draw(st.sampled_from(MODELS[:3])), "--method", method]
    usable = [o for o in (*METHOD_OPTIONS, *SETUP_OPTIONS) if method in o.methods]
    for option in draw(st.lists(st.sampled_from(usable), max_size=4, unique_by=lambda o: o.flag)):
        if option.type is bool:
            argv.append(draw(st.sampled_from([option.flag, "--no-" + option.flag[2:]])))
        else:
            argv += [option.flag, draw(takes(option))]
    for extra in draw(st.lists(st.sampled_from(EXTRAS), max_size=2)):
        argv += extra
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(argv)))
        kind = draw(st.sampled_from(["replace", "flag and value", "switch", "junk"]))
        if kind == "replace" and at < len(argv):
            argv[at] = draw(st.sampled_from(MODELS) | anything) if at == 0 else draw(anything)
        elif kind == "flag and value":
            argv[at:at] = [draw(st.sampled_from(VALUE_FLAGS)), draw(anything)]
        elif kind == "switch":
            argv.insert(at, draw(st.sampled_from(SWITCHES)))
        else:
            argv.insert(at, draw(junk | st.sampled_from(["--", "-x", "--rank=9", "--seq-len=", "--no-json"])))
    return argv


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def fits_64_bits(value) -> bool:
    if isinstance(value, dict):
        return all(fits_64_bits(v) for v in value.values())
    if isinstance(value, list):
        return all(fits_64_bits(v) for v in value)
    return not isinstance(value, int) or -INT64 <= value < INT64


@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(argvs())
@example(["x" * 5000, "--method", "lora"])  # OSError 36 (file name too long) before the caps
@example(["llama-7b", "--method", "lora", "--batch-size", "1048576", "--seq-len", "16777216", "--json"])
@example(["llama-7b", "--method", "qgalore", "--weight-group-size", "7", "--lora-alpha", "nan"])
def test_every_command_line_gets_an_estimate_or_one_line_and_status_2(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
    out, err = out.getvalue(), err.getvalue()
    if status == 0 and out.startswith("usage:"):  # an abbreviation of --help among the junk
        return
    if status == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m estimator: error: "), err
        assert out == "" and "Traceback" not in err
        return
    assert status == 0, (status, err)
    assert err == "" and out
    if out.startswith("{"):
        assert fits_64_bits(json.loads(out))
    else:
        assert "peak allocated" in out
