"""The app in a real browser: Debian's Chromium driven by Playwright (never `playwright install`).

Plan: change a method option and see the chart change. Train: start a short CPU run of two methods,
see the loss curve grow and predicted-vs-measured appear; stop a run while an estimate is answered;
reload a past run. Dry run: a 7B step "measured" on fake tensors.
Screenshots of each tab go to $SCREENSHOT_DIR (default: a pytest temporary folder):
plan.png, train.png, train-stopped.png, dryrun.png.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.app.serving import WAIT_S, open_page, wait_until

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(served_app, tmp_path_factory):
    with open_page(served_app[0], tmp_path_factory.mktemp("chromium-profile")) as page:
        yield page


def plot(page, elem_id: str) -> list[dict] | None:
    """The traces plotly drew in the gr.Plot with this id: name, x, y."""
    return page.evaluate("""id => {
        const g = document.querySelector('#' + id + ' .js-plotly-plot');
        return g && g.data ? g.data.map(t => ({name: t.name, x: t.x, y: t.y})) : null }""", elem_id)


def bar(traces: list[dict], category: str, method: str) -> float:
    trace = next(t for t in traces if t["name"] == category)
    return trace["y"][trace["x"].index(method)]


def set_number(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.wait_for(state="visible")
    box.fill(str(value))
    box.press("Enter")


def test_plan_chart_follows_a_method_option(page, shots):
    before = bar(plot(page, "plan-breakdown"), "adapters", "lora")
    page.locator("#plan-lora-options").get_by_text("LoRA options").click()

    def adapters_grew():
        """LoRA's adapters bar to grow with the rank"""
        return bar(plot(page, "plan-breakdown"), "adapters", "lora") > 7 * before

    # On a loaded machine the first keystrokes can land before the freshly opened accordion's
    # input is wired up (seen once in CI: the chart never changed); type again, a new value each
    # time so the change is real, before giving up
    for attempt, rank in enumerate((64, 72, 96)):
        set_number(page, "plan-lora-rank", rank)
        try:
            wait_until(adapters_grew, timeout=WAIT_S / 3)
            break
        except AssertionError:
            if attempt == 2:
                raise
    assert "llama-7b" in page.locator("#plan-notes").inner_text()
    page.screenshot(path=str(shots / "plan.png"), full_page=True)


def test_train_live_then_predicted_vs_measured(page, shots):
    page.get_by_role("tab", name="Train").click()
    methods = page.locator("#train-methods")
    methods.get_by_label("Full training").uncheck()  # LoRA and GaLore stay ticked
    set_number(page, "train-steps", 6)
    set_number(page, "train-eval-every", 3)
    page.get_by_text("batch and precision").click()
    set_number(page, "train-batch_size", 2)
    set_number(page, "train-seq_len", 64)
    page.locator("#train-start").click()

    seen = []

    def both_runs_measured():
        """both runs to end with predicted and measured bars"""
        traces = plot(page, "train-loss") or []
        points = sum(len(t["y"] or []) for t in traces if not t["name"].endswith("(eval)"))
        if points and (not seen or points != seen[-1]):
            seen.append(points)
        compare = plot(page, "train-compare") or []
        return compare and compare[0]["name"] == "weights" and len(compare[0]["x"][0]) == 4 \
            and "Done" in page.locator("#train-status").inner_text()

    wait_until(both_runs_measured)
    assert len(seen) >= 2 and seen == sorted(seen), seen  # the curve grew while the runs went on
    assert seen[-1] == 12
    compare = plot(page, "train-compare")
    assert compare[0]["x"][1] == ["predicted", "measured"] * 2
    assert {t["name"] for t in plot(page, "train-layers")} == {"GaLore"}
    table = page.locator("#train-table").inner_text()
    assert table.count("completed") == 2 and "%" in table
    assert "lora-adapter" in page.locator("#train-files").inner_text()  # the downloads
    page.screenshot(path=str(shots / "train.png"), full_page=True)


def test_stop_a_run_while_estimates_go_on(page, shots, served_app):
    from gradio_client import Client

    methods = page.locator("#train-methods")
    methods.get_by_label("GaLore", exact=True).uncheck()
    set_number(page, "train-steps", 5000)
    page.locator("#train-start").click()
    wait_until(lambda: "step " in page.locator("#train-progress").inner_text())
    begin = time.monotonic()  # the device's queue slot is taken; an estimate does not wait for it
    result = Client(served_app[0], verbose=False).predict(model="llama-7b", method="lora", api_name="/estimate")
    assert result["peak_bytes"] > 0 and time.monotonic() - begin < 30
    assert "step " in page.locator("#train-progress").inner_text()  # still training
    page.locator("#train-stop").click()

    def stopped():
        """the run to end as stopped"""
        return "Stopped" in page.locator("#train-status").inner_text() \
            and "stopped" in page.locator("#train-table").inner_text()

    wait_until(stopped)
    page.screenshot(path=str(shots / "train-stopped.png"), full_page=True)


def test_past_runs_reload(page):
    page.get_by_text("Past runs").click()
    page.locator("#past-runs input").click()
    options = page.get_by_role("option")
    wait_until(lambda: options.count() == 3)  # lora and galore completed, one lora stopped
    options.filter(has_text="galore").first.click()
    page.keyboard.press("Escape")
    page.locator("#past-load").click()

    def reloaded():
        """the past GaLore run to be shown again"""
        table = page.locator("#train-table").inner_text()
        return "1 past run" in page.locator("#train-status").inner_text() and "galore" in table \
            and "completed" in table

    wait_until(reloaded)
    layers = plot(page, "train-layers")  # the layer gaps of that run are back too
    assert len(layers) == 1 and layers[0]["name"].startswith("GaLore · ")


def test_dry_run_measures_a_7b_step_on_fake_tensors(page, shots):
    page.get_by_role("tab", name="Dry run").click()
    page.locator("#dryrun-start").click()

    def measured():
        """the 7B step to be measured"""
        return "measured peak" in page.locator("#dryrun-status").inner_text()

    wait_until(measured)
    assert plot(page, "dryrun-chart")[0]["x"][1] == ["predicted", "measured"]
    page.screenshot(path=str(shots / "dryrun.png"), full_page=True)
