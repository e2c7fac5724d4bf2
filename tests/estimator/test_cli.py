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
    assert main(["tiny-llama-20m", "--method", "lora", "--rank", "16", "--gpus"]) == 0
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


PINNED = Path(__file__).parent / "pinned"


@pytest.mark.parametrize("args,pinned", [
    (["llama-7b", "--method", "galore", "--rank", "1024", "--optimizer", "adamw8bit", "--layerwise",
      "--batch-size", "1", "--seq-len", "256"], "galore-7b.txt"),
    (["tiny-llama-20m", "--method", "qlora", "--rank", "16", "--batch-size", "2", "--seq-len", "128",
      "--grad-checkpointing", "--json", "--gpus", "--max-batch-size", "RTX 4090"], "qlora-20m.json"),
], ids=["text", "json"])
def test_output_is_pinned(args, pinned, capsys):
    """The readable table and the JSON object, byte for byte as recorded (tests/estimator/pinned):
    a refactor that changes a number or the layout fails here."""
    assert main(args) == 0
    assert capsys.readouterr().out == (PINNED / pinned).read_text()
