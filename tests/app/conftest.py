"""The app served for real: `served_app` builds it over a fresh runs folder and serves it in this process."""

from __future__ import annotations

import os

import pytest

from tests.app.serving import serve

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def served_app(tmp_path_factory):
    """(url, runs folder) of the app running in a background thread for the whole session."""
    yield from serve(tmp_path_factory.mktemp("runs"))
