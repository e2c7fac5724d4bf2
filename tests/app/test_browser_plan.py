"""The Plan tab in a real browser (Debian's Chromium through Playwright, as tests/app/test_browser.py):
what the handler tests cannot see — table headers as drawn, the methods' labels on the chart's axis,
and the page after an error.
"""

from __future__ import annotations

import pytest

from tests.app.serving import open_page, wait_until
from ui.plan import SOURCES, SUMMARY_COLUMNS
from ui.widgets import METHOD_LABELS

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(served_app, tmp_path_factory):
    with open_page(served_app[0], tmp_path_factory.mktemp("chromium-plan"), width=1024) as page:
        yield page


def headers(page, elem_id: str) -> list[tuple[str, int]]:
    """Each header cell of a table as drawn: (its text, the lines that text takes)."""
    return page.evaluate("""id => Array.from(document.querySelectorAll('#' + id + ' thead th span.header'))
        .map(span => {
            const range = document.createRange();
            range.selectNodeContents(span);
            const tops = new Set(Array.from(range.getClientRects()).filter(r => r.width > 0)
                                 .map(r => Math.round(r.top)));
            return [span.innerText.trim(), tops.size];
        })""", elem_id)


def bar_traces(page) -> int | None:
    return page.evaluate("""() => {
        const g = document.querySelector('#plan-breakdown .js-plotly-plot');
        return g && g.data ? g.data.filter(t => t.type === 'bar').length : null }""")


def test_table_headers_are_whole_words_on_one_line(page):
    summary = wait_until(lambda: headers(page, "plan-summary"))
    assert [text for text, _ in summary] == list(SUMMARY_COLUMNS)
    gpus = wait_until(lambda: headers(page, "plan-gpus"))
    assert [text for text, _ in gpus] == ["GPU", "memory", *METHOD_LABELS.values()]
    broken = [(text, lines) for text, lines in summary + gpus if lines != 1]
    assert not broken, f"headers drawn on more than one line (cut mid-word): {broken}"


def test_the_chart_names_methods_by_their_labels(page):
    ticks = wait_until(lambda: page.locator("#plan-breakdown .xtick text").all_text_contents())
    assert ticks == list(METHOD_LABELS.values())


def test_an_error_clears_the_previous_models_numbers(page):
    assert bar_traces(page) and "llama-7b" in page.locator("#plan-notes").inner_text()
    page.get_by_role("radio", name=SOURCES[1]).check()
    box = page.get_by_role("textbox", name=SOURCES[1])
    box.fill("llama-7c")
    box.press("Enter")

    def cleared():
        """the charts and tables of llama-7b to give way to the error"""
        notes = page.locator("#plan-notes").inner_text()
        return "Cannot estimate" in notes and "did you mean llama-7b" in notes and bar_traces(page) == 0 \
            and page.locator("#plan-summary tbody tr").count() <= 1 \
            and "GiB" not in page.locator("#plan-summary").inner_text()

    wait_until(cleared)
    assert "llama-7b" not in page.locator("#plan-notes").inner_text().replace("did you mean llama-7b", "")
    page.get_by_role("radio", name=SOURCES[0]).check()
    wait_until(lambda: bar_traces(page) and "llama-7b" in page.locator("#plan-notes").inner_text())
