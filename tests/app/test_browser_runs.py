"""The Train tab's Past runs in a real browser (Debian's Chromium through Playwright): a runs folder
with an unreadable run lists it with the reason, and Delete removes it once confirmed.

The app is served over its own runs folder here, so the runs of tests/app/test_browser.py are not touched.
"""

from __future__ import annotations

import json

import pytest

from tests.app.serving import open_page, serve, wait_until

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def odd_app(tmp_path_factory):
    """(url, runs folder) of the app over a runs folder holding a good run and an unreadable one."""
    runs = tmp_path_factory.mktemp("odd-runs")
    for name, summary in (("good-lora", {"status": "completed", "final": {"loss": 4.25}}), ("broken", [1, 2, 3])):
        out = runs / name
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model": "tiny-llama-5m", "method": {"method": "lora"}}))
        (out / "summary.json").write_text(json.dumps(summary))
        (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    yield from serve(runs)


@pytest.fixture(scope="module")
def page(odd_app, tmp_path_factory):
    with open_page(odd_app[0], tmp_path_factory.mktemp("chromium-profile")) as page:
        yield page


def test_an_unreadable_run_is_listed_and_deleted_once_confirmed(page, odd_app):
    runs = odd_app[1]
    page.get_by_role("tab", name="Train").click()
    page.get_by_text("Past runs").click()
    page.locator("#past-runs input").click()
    options = page.get_by_role("option")
    wait_until(lambda: options.count() == 2)
    broken = options.filter(has_text="unreadable: summary.json holds a list, not a JSON object")
    assert broken.count() == 1 and options.filter(has_text="loss 4.250").count() == 1
    broken.click()
    page.keyboard.press("Escape")

    page.locator("#past-delete").click()  # not confirmed: nothing happens but a message

    def refused():
        """the page to ask for the confirmation"""
        return page.get_by_text("deleting cannot be undone").count() > 0

    wait_until(refused, timeout=60)
    assert (runs / "broken").exists()

    page.locator("#past-delete-confirm input").check()
    page.locator("#past-delete").click()

    def deleted():
        """the page to say what was deleted"""
        return "Deleted 1 run(s): broken" in page.locator("#past-deleted").inner_text()

    wait_until(deleted, timeout=60)
    assert not (runs / "broken").exists() and (runs / "good-lora").exists()
    assert not page.locator("#past-delete-confirm input").is_checked()
    page.locator("#past-runs input").click()
    wait_until(lambda: options.count() == 1)
    assert "good-lora" in options.first.inner_text()
