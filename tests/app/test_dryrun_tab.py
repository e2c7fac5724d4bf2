"""The Dry run tab's handler: the estimate at once, then a fake-tensor measurement from a worker process."""

from __future__ import annotations

import pytest

from estimator.config import LoRAConfig, TrainSetup
from ui.dryrun import dry_run_steps


def test_the_estimate_shows_first_then_the_measurement_beside_it(tmp_path):
    steps = dry_run_steps("tiny-llama-5m", LoRAConfig(rank=4), TrainSetup(batch_size=2, seq_len=64), "cpu", tmp_path)
    figure, table, status = next(steps)
    assert "Measuring" in status and table["measured (fake tensors)"].eq("—").all()
    assert [list(t.x[1]) for t in figure.data][0] == ["predicted"]
    figure, table, status = next(steps)
    assert [list(t.x[1]) for t in figure.data][0] == ["predicted", "measured"]
    peak = table.set_index("category").loc["peak"]
    assert abs(float(peak["error"].rstrip("%"))) < 5
    assert "measured peak" in status
    assert (tmp_path / ".dryrun").is_dir()


def test_a_bad_model_fails_at_once_without_a_worker(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        next(dry_run_steps("llama-7c", LoRAConfig(), TrainSetup(), "cpu", tmp_path))
    assert not (tmp_path / ".dryrun").exists()
