"""The app served for real, and what the browser tests share: Debian's Chromium driven by
Playwright (never `playwright install`, which downloads a browser), a page open on a served app,
and polling for what it shows."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
WAIT_S = 300  # a loaded 2-core machine starts a worker in 5-20 s
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(runs: Path) -> Iterator[tuple[str, Path]]:
    """Build the app over the runs folder `runs` and serve it in a background thread; yields
    (url, runs) until the caller is done, then stops its runs and the server."""
    import app
    from ui.runner import Runner

    runner = Runner(runs)
    demo = app.build_ui(runs, runner)
    port = free_port()
    app.launch(demo, runs, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", runs
    runner.stop_all()
    demo.close()


@contextlib.contextmanager
def open_page(url: str, profile: Path, width: int = 1440) -> Iterator:
    """A headless Chromium page on the app at `url`, once the Plan tab has drawn its chart."""
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=ARGS, viewport={"width": width, "height": 1000})
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#plan-breakdown .js-plotly-plot")
        yield page
        browser.close()


def wait_until(check, timeout: float = WAIT_S, every: float = 0.25):
    """`check()`'s first true value, polled every `every` s; AssertionError after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {check.__doc__ or check}")
