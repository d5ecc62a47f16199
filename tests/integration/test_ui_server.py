"""``roundlog ui`` over HTTP: who may reach it (loopback, or a bearer token), and what it answers."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from roundlog.cli import main
from roundlog.projections.schema import upgrade
from roundlog.ui.app import TOKEN_COOKIE, Exposed, check_exposure, create_app

from tests.browser.serving import serving

TOKEN = "s3cret-token"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    check_exposure(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "dashboard.example.org"])
def test_any_other_address_needs_a_token(host: str) -> None:
    with pytest.raises(Exposed, match="ROUNDLOG_UI_TOKEN"):
        check_exposure(host, None)
    check_exposure(host, TOKEN)


def test_the_command_refuses_to_listen_everywhere_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ROUNDLOG_UI_TOKEN", raising=False)
    assert main(["ui", "--host", "0.0.0.0"]) == 2
    assert "set ROUNDLOG_UI_TOKEN" in capsys.readouterr().err


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    upgrade(database_url)
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    yield engine
    engine.dispose()


def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """One request, redirects not followed: status, headers, body."""
    address = urlsplit(base)
    conn = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def test_with_a_token_only_its_bearers_get_in(engine: sa.Engine) -> None:
    with serving(create_app(engine, TOKEN)) as base:
        assert get(base, "/")[0] == 401
        assert get(base, "/static/dashboard.css")[0] == 401
        assert get(base, "/", {"Authorization": "Bearer wrong"})[0] == 401
        status, _, body = get(base, "/", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and "no sessions yet" in body
        status, headers, _ = get(base, "/rejected?token=" + TOKEN)
        assert status == 303 and headers["location"].endswith("/rejected")
        cookie = headers["set-cookie"].split(";")[0]
        assert cookie == f"{TOKEN_COOKIE}={TOKEN}" and "HttpOnly" in headers["set-cookie"]
        assert get(base, "/rejected", {"Cookie": cookie})[0] == 200


def test_without_a_token_pages_and_assets_are_served(engine: sa.Engine) -> None:
    with serving(create_app(engine)) as base:
        status, _, body = get(base, "/")
        assert status == 200 and "no sessions yet" in body
        status, _, body = get(base, "/rejected")
        assert status == 200 and "nothing rejected" in body
        assert get(base, "/sessions/nope")[0] == 404
        assert get(base, "/sessions/nope/participation")[0] == 404
        status, headers, body = get(base, "/static/uPlot.iife.min.js")
        assert status == 200 and "javascript" in headers["content-type"] and "uPlot" in body
