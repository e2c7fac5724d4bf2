"""The named API endpoint `estimate`, called with gradio_client against the running app."""

from __future__ import annotations

import logging

import pytest

from estimator.config import QLoRAConfig, TrainSetup
from estimator.estimate import estimate


def test_estimate_endpoint_from_gradio_client(served_app):
    from gradio_client import Client

    url, _ = served_app
    client = Client(url, verbose=False)
    assert "/estimate" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    result = client.predict(model="llama-65b", method="qlora", options={"rank": 64, "targets": "all-linear"},
                            batch_size=1, seq_len=512, grad_checkpointing=True, api_name="/estimate")
    expected = estimate("llama-65b", QLoRAConfig(rank=64), TrainSetup(batch_size=1, seq_len=512,
                                                                       grad_checkpointing=True))
    assert result["peak_bytes"] == expected.peak_bytes and result["breakdown"] == expected.breakdown
    assert any(g["fits"] and g["memory_gib"] == 48 for g in result["gpus"])


def test_estimate_endpoint_errors_name_the_field(served_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served_app[0], verbose=False)
    with pytest.raises(AppError, match="rank=0 must be a whole number"):
        client.predict(model="llama-7b", method="lora", options={"rank": 0}, api_name="/estimate")


def test_a_handled_error_is_one_log_line_not_a_traceback(served_app, capfd, caplog):
    """Bad input is the caller's mistake, answered with a message: the server logs it as one line."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(served_app[0], verbose=False)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="lowrank-memory"), \
            pytest.raises(AppError, match="stagger=2 must be true or false"):
        client.predict(model="llama-7b", method="galore", options={"stagger": 2}, api_name="/estimate")
    assert "Traceback" not in capfd.readouterr().err
    lines = [r.getMessage() for r in caplog.records if r.name == "lowrank-memory"]
    assert lines == ["estimate: Cannot estimate: stagger=2 must be true or false"]
