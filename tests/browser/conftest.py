"""A real demo on the embedded stack, the dashboard over it, and a headless Chromium to look at it.

Chromium and its driver come from the system (Debian's ``chromium`` and ``chromium-driver``, which
``make test-browser`` installs where missing). Without them the tests are skipped, saying so; in CI
(``CI`` set) that is a failure, so the dashboard is always looked at there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from roundlog.config import Settings
from roundlog.demo import Options, run
from roundlog.ui.app import create_app

from tests.browser.serving import serving
from tests.servers import fresh_database

ROOT = Path(__file__).resolve().parents[2]
#: Where each page's screenshot goes: the test's artifacts.
SCREENSHOTS = Path(os.environ.get("ROUNDLOG_SCREENSHOTS", ROOT / "build" / "screenshots"))
#: A small demo: a few rounds, one straggler whose updates are late.
DEMO = Options(clients=4, rounds=3, stragglers=1)


@dataclass(frozen=True)
class Dashboard:
    url: str
    engine: sa.Engine
    session_id: str


def _tools() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "chromium and chromedriver not on PATH (make test-browser installs them)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def chrome() -> Iterator[webdriver.Chrome]:
    browser, driver = _tools()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="session")
def dashboard(stack: Settings, chrome: webdriver.Chrome) -> Iterator[Dashboard]:
    """The demo's session, projected into a database of its own, and the dashboard serving it."""
    with fresh_database(stack) as database_url:
        settings = dataclasses.replace(
            stack, database_url=database_url, topic_prefix=f"browser-{uuid.uuid4().hex[:12]}"
        )
        assert run(settings, DEMO) == 0, "the demo failed: its session or its audit"
        engine = sa.create_engine(database_url, poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                session_id = conn.execute(sa.text("SELECT session_id FROM sessions")).scalar_one()
            with serving(create_app(engine)) as url:
                yield Dashboard(url, engine, session_id)
        finally:
            engine.dispose()
