"""bench/gpu_7b.py (the 7B check of bench/gpu_check.sh) on the CPU with a tiny preset: one process
per method, the load and the steps measured beside the estimate, the markdown table and the JSON
rows — so the script is known to run before a GPU ever sees it."""

from __future__ import annotations

import json

from bench.gpu_7b import main


def test_the_7b_check_runs_on_the_cpu_with_a_tiny_preset(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["--device", "cpu", "--quick", "--methods", "qlora", "--shapes", "1x32,2x32", "--steps", "2",
                 "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    rows = json.loads(out.read_text())
    assert [row["method"] for row in rows] == ["qlora"]
    for row in rows:
        assert row["load_allocated"] > 0 and row["load_reserved"] is None  # the CPU reserves nothing
        assert abs(row["load_predicted"] - row["load_allocated"]) <= 0.03 * row["load_allocated"]
        assert [shape["shape"] for shape in row["shapes"]] == ["1x32", "2x32"]
        for shape in row["shapes"]:
            assert abs(shape["step_predicted"] - shape["step_allocated"]) <= 0.05 * shape["step_allocated"]
    assert "| QLoRA r8 | 1x32 |" in text
    assert main(["--device", "cpu", "--quick", "--methods", "full", "--budget", "0"]) == 0
    assert "skipped: out of --budget" in capsys.readouterr().out
