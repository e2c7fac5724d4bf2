"""The app served for real: `app_url` builds it over a fresh runs folder and serves it in this process."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served_app(tmp_path_factory):
    """(url, runs folder) of the app running in a background thread for the whole session."""
    import app
    from ui.runner import Runner

    runs = tmp_path_factory.mktemp("runs")
    runner = Runner(runs)
    demo = app.build_ui(runs, runner)
    port = free_port()
    app.launch(demo, runs, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", runs
    runner.stop_all()
    demo.close()
