"""The dashboard of a finished demo, as headless Chromium renders it, against the SQL views.

Every number checked on a page is read back from the rendered DOM (or from the chart objects the
page built) and compared with a query written here, straight on the projection tables and views.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.browser.conftest import DEMO, SCREENSHOTS, Dashboard


def sql(dashboard: Dashboard, query: str, **params: Any) -> list[sa.Row[Any]]:
    with dashboard.engine.connect() as conn:
        return list(conn.execute(sa.text(query), params))


def visit(chrome: webdriver.Chrome, dashboard: Dashboard, path: str, shot: str) -> None:
    """Open a page, fail on any console error, and keep a full-page screenshot of it."""
    chrome.get(dashboard.url + path)
    assert chrome.execute_script("return document.readyState") == "complete"
    errors = [entry for entry in chrome.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], f"console errors on {path}: {errors}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # the window's size includes its frame: grow it until the viewport holds the whole page
    height = int(chrome.execute_script("return document.documentElement.scrollHeight"))
    frame = chrome.get_window_size()["height"] - int(chrome.execute_script("return window.innerHeight"))
    chrome.set_window_size(1400, height + frame)
    chrome.save_screenshot(str(SCREENSHOTS / f"{shot}.png"))
    chrome.set_window_size(1400, 1000)


def text(chrome: webdriver.Chrome, css: str) -> str:
    return str(chrome.find_element(By.CSS_SELECTOR, css).text)


def test_sessions_page(chrome: webdriver.Chrome, dashboard: Dashboard) -> None:
    visit(chrome, dashboard, "/", "sessions")
    [progress] = sql(dashboard, "SELECT state, rounds_done, rounds_total FROM session_progress")
    row = f'tr[data-session-id="{dashboard.session_id}"]'
    assert text(chrome, f"{row} td.state") == progress.state == "completed"
    assert int(text(chrome, f"{row} .rounds-done")) == progress.rounds_done == DEMO.rounds
    assert int(text(chrome, f"{row} .rounds-total")) == progress.rounds_total
    [accuracy] = sql(
        dashboard,
        """
        SELECT sum((v.metrics->>'accuracy')::float8 * v.num_examples) / sum(v.num_examples) AS mean
        FROM validations v JOIN rounds r USING (round_id)
        WHERE r.round_no = (SELECT max(round_no) FROM rounds WHERE task = 'validation')
        """,
    )
    shown = chrome.find_element(By.CSS_SELECTOR, f'{row} [data-metric="accuracy"]')
    assert float(shown.get_attribute("data-value") or "nan") == pytest.approx(accuracy.mean, rel=1e-12)
    assert shown.text == f"accuracy {accuracy.mean:.4f}"


def test_session_page(chrome: webdriver.Chrome, dashboard: Dashboard) -> None:
    visit(chrome, dashboard, f"/sessions/{dashboard.session_id}", "session")
    charts = chrome.execute_script(
        "return window.roundlogCharts.map(c => ({title: c.root.querySelector('.u-title').textContent,"
        " labels: c.series.slice(1).map(s => s.label), data: c.data}))"
    )
    assert [c["title"] for c in charts] == ["accuracy", "loss"]
    assert all(len(series) == DEMO.rounds for c in charts for series in c["data"])
    assert all(c["labels"] == [f"training {c['title']}", f"validation {c['title']}"] for c in charts)
    validation = sql(
        dashboard,
        """
        SELECT r.round_no,
               sum((v.metrics->>'accuracy')::float8 * v.num_examples) / sum(v.num_examples) AS acc,
               sum((v.metrics->>'loss')::float8 * v.num_examples) / sum(v.num_examples) AS loss
        FROM validations v JOIN rounds r USING (round_id) GROUP BY r.round_no ORDER BY r.round_no
        """,
    )
    accuracy, loss = charts
    assert accuracy["data"][0] == [v.round_no for v in validation]
    assert accuracy["data"][2] == pytest.approx([v.acc for v in validation], rel=1e-12)
    assert loss["data"][2] == pytest.approx([v.loss for v in validation], rel=1e-12)

    timeline = sql(
        dashboard,
        "SELECT round_id, state, timed_out, n_assigned, n_accepted, n_rejected, total_s FROM round_timeline",
    )
    assert (
        len(chrome.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")) == len(timeline) == 2 * DEMO.rounds
    )
    for r in timeline:
        row = f'#timeline tr[data-round-id="{r.round_id}"]'
        assert text(chrome, f"{row} td.state") == r.state
        assert [int(text(chrome, f"{row} td.{c}")) for c in ("n-assigned", "n-accepted", "n-rejected")] == [
            r.n_assigned,
            r.n_accepted,
            r.n_rejected,
        ]
        assert text(chrome, f"{row} td.total-s") == f"{r.total_s:.2f}"
        assert text(chrome, f"{row} td.close") == ("timed out" if r.timed_out else "quorum reached")
        assert chrome.find_elements(By.CSS_SELECTOR, f"{row} .seg.collecting"), "its collecting time is drawn"

    for r in sql(
        dashboard,
        "SELECT round_id, COALESCE(reject_reason, status) AS outcome, count(*) AS n FROM round_updates "
        "GROUP BY 1, 2",
    ):
        assert (
            int(text(chrome, f'#updates tr[data-round-id="{r.round_id}"] td[data-outcome="{r.outcome}"]'))
            == r.n
        )

    models = sql(
        dashboard,
        "SELECT m.model_id, m.sha256, a.verified FROM models m "
        "LEFT JOIN model_audits a USING (model_id) WHERE m.origin = 'aggregated'",
    )
    assert len(models) == DEMO.rounds and all(m.verified for m in models), "the demo's audit verified them"
    for m in models:
        row = f'#lineage tr[data-model-id="{m.model_id}"]'
        assert text(chrome, f"{row} td.sha256") == m.sha256
        assert text(chrome, f"{row} td.audit") == "verified"


def test_participation_page(chrome: webdriver.Chrome, dashboard: Dashboard) -> None:
    visit(chrome, dashboard, f"/sessions/{dashboard.session_id}/participation", "participation")
    late = sql(dashboard, "SELECT client_id, round_id FROM round_updates WHERE reject_reason = 'late'")
    assert late, "the straggler was late at least once"
    for update in late:
        cell = chrome.find_element(
            By.CSS_SELECTOR, f'td[data-client-id="{update.client_id}"][data-round-id="{update.round_id}"]'
        )
        assert cell.get_attribute("data-kind") == "late" and cell.text == "late"
    [accepted] = sql(
        dashboard,
        "SELECT (SELECT count(*) FROM round_updates WHERE status = 'accepted') "
        "+ (SELECT count(*) FROM validations) AS n",
    )
    assert len(chrome.find_elements(By.CSS_SELECTOR, 'td[data-kind="accepted"]')) == accepted.n
    clients = sql(dashboard, "SELECT client_id, n_accepted, n_rejected FROM client_participation")
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#grid tbody tr")) == len(clients) == DEMO.clients
    for c in clients:
        cells = [
            td.text
            for td in chrome.find_elements(By.CSS_SELECTOR, f'#totals tr[data-client-id="{c.client_id}"] td')
        ]
        assert (int(cells[6]), int(cells[7])) == (c.n_accepted, c.n_rejected)


def test_rejected_page(chrome: webdriver.Chrome, dashboard: Dashboard) -> None:
    visit(chrome, dashboard, "/rejected", "rejected")
    reasons = sql(dashboard, "SELECT reason, count(*) AS n FROM rejected_events GROUP BY reason")
    assert {r.reason for r in reasons} >= {"late"}
    shown = {
        row.get_attribute("data-reason"): int(row.find_element(By.CSS_SELECTOR, "td.num").text)
        for row in chrome.find_elements(By.CSS_SELECTOR, "#by-reason tbody tr")
    }
    assert shown == {r.reason: r.n for r in reasons}
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#rejected tbody tr")) == sum(r.n for r in reasons)
