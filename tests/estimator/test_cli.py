"""`python -m estimator`: the JSON contract (docs/design.md), a readable table, one-line errors with status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "estimator", *args], capture_output=True, text=True, timeout=120)


def test_json_contract():
    result = run("llama-7b", "--method", "galore", "--rank", "1024", "--optimizer", "adamw8bit", "--layerwise",
                 "--batch-size", "1", "--seq-len", "256", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"model", "method", "params", "peak_bytes", "phase", "breakdown", "overhead_bytes"} <= set(data)
    assert data["params"]["total"] == 6_738_415_616 and data["phase"] in ("forward", "backward", "optimizer")
    assert set(data["breakdown"]) == {"weights", "adapters", "gradients", "optimizer", "activations", "transient"}
    assert sum(data["breakdown"].values()) == data["peak_bytes"]


def test_readable_table_and_gpus(capsys):
    assert main(["tiny-llama-20m", "--method", "lora", "--rank", "16", "--fit-table"]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "RTX 4090" in out and "weights" in out


def test_max_batch_size(capsys):
    assert main(["llama-1b", "--method", "qlora", "--max-batch-size", "rtx 4090", "--seq-len", "512", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_batch_size"]["gpu"] == "RTX 4090" and data["max_batch_size"]["batch_size"] >= 1


@pytest.mark.parametrize("args,message", [
    (["llama-7b", "--method", "lora", "--rank", "0"], "--rank 0 must be a whole number"),
    (["llama-7b", "--method", "lora", "--rank", "5000"], "--rank 5000 is above the smallest target dimension"),
    (["llama-7b", "--method", "lora", "--batch-size", "0"], "--batch-size 0 must be"),
    (["llama7b", "--method", "lora"], "did you mean llama-7b"),
    (["llama-7b", "--method", "full", "--rank", "8"], "--rank does not apply to --method full"),
    (["llama-7b", "--method", "lora", "--lora-targets", "q,v"], "no linear layer named q, v"),
    (["llama-7b", "--method", "dora"], "invalid choice"),
    (["llama-7b", "--method", "lora", "--rank", "x"], "invalid int value"),
    (["llama-7b", "--method", "lora", "--max-batch-size", "gtx 480"], "not in the catalog"),
    (["/no/such/config.json", "--method", "lora"], "no such file"),
    (["x" * 5000, "--method", "lora"], "is 5,000 characters long"),
    (["/" + "x" * 300, "--method", "lora"], "File name too long"),
    (["llama-7b", "--method", "lora", "--batch-size", str(10**12)], "--batch-size 1000000000000 must be a whole number ≤"),
    (["llama-7b", "--method", "lora", "--batch-size", "1048576", "--seq-len", "16777216"], "beyond what 64 bits hold"),
    (["llama-7b", "--method", "qgalore", "--weight-group-size", "7"], "--weight-group-size 7 must be a power of two"),
    (["llama-7b", "--method", "lora", "--lora-alpha", "nan"], "--lora-alpha nan must be a number > 0"),
    (["llama-7b", "--method", "lora", "--lora-alpha", "1e308"], "--lora-alpha 1e+308 must be a number > 0"),
    (["llama-7b", "--method", "lora", "junk\nword"], "unrecognized arguments: junk word"),
])
def test_bad_input_is_one_line_and_status_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_malformed_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{oops")
    result = run(str(path), "--method", "full")
    assert result.returncode == 2 and "not valid JSON" in result.stderr


@pytest.mark.parametrize("content, message", [
    ('{"model_type": "llama", "x": ' + "[" * 5000 + "]" * 5000 + "}", "nests deeper than 32 levels"),
    ('{"model_type": "llama", "num_hidden_layers": 20000}', "num_hidden_layers=20000 must be a whole number from 1"),
    ('{"model_type": "llama", "pad": "' + "x" * (1 << 20) + '"}', "larger than 1 MB"),
])
def test_hostile_config_files_are_one_line_and_status_2(tmp_path, content, message, capsys):
    """A deep, huge or absurd config.json: refused in milliseconds, with one line (in-process: no
    interpreter start per case)."""
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--method", "lora"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err


PINNED = Path(__file__).parent / "pinned"


@pytest.mark.parametrize("args,pinned", [
    (["llama-7b", "--method", "galore", "--rank", "1024", "--optimizer", "adamw8bit", "--layerwise",
      "--batch-size", "1", "--seq-len", "256"], "galore-7b.txt"),
    (["tiny-llama-20m", "--method", "qlora", "--rank", "16", "--batch-size", "2", "--seq-len", "128",
      "--grad-checkpointing", "--json", "--fit-table", "--max-batch-size", "RTX 4090"], "qlora-20m.json"),
], ids=["text", "json"])
def test_output_is_pinned(args, pinned, capsys):
    """The readable table and the JSON object, byte for byte as recorded (tests/estimator/pinned):
    a refactor that changes a number or the layout fails here."""
    assert main(args) == 0
    assert capsys.readouterr().out == (PINNED / pinned).read_text()
