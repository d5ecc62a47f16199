"""The dashboard as an ASGI app: server-rendered pages over ``roundlog.ui.queries``, read-only.

Every page is one read of the projections; a page of a running session reloads itself, so
the dashboard follows the projector without a socket of its own. Charts are drawn in the
browser by uPlot, shipped in ``static/`` with the package, so a page works offline.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from roundlog.ui import queries

#: A page of a running session reloads itself this often (seconds).
REFRESH_SECONDS = 5
#: Rejected records listed on one page, newest first (the counts by reason cover them all).
REJECTED_SHOWN = 500
#: The cookie a browser keeps the token in once it has opened a ``?token=`` link.
TOKEN_COOKIE = "roundlog_ui_token"


class Exposed(ValueError):
    """The dashboard would be reachable from other machines without a token."""


def check_exposure(host: str, token: str | None) -> None:
    """Refuse a bind address other than loopback unless a token guards it."""
    if token or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if not loopback:
        raise Exposed(
            f"--host {host} makes the dashboard reachable from other machines: set ROUNDLOG_UI_TOKEN "
            "to a secret that requests must bear (Authorization: Bearer TOKEN, or open /?token=TOKEN once)"
        )


def create_app(engine: sa.Engine, token: str | None = None) -> Starlette:
    """The dashboard over the projections ``engine`` connects to; with ``token``, only for its bearers."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("roundlog.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters.update(seconds=_seconds, moment=_moment, short=_short, metric=_metric)
    templates = Jinja2Templates(env=environment)

    def page(request: Request, name: str, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, {"refresh": REFRESH_SECONDS, **context})

    def sessions_page(request: Request) -> Response:
        with engine.connect() as conn:
            rows = queries.sessions(conn)
            metrics = queries.last_metrics(conn)
        live = any(s.state == queries.RUNNING for s in rows)
        return page(request, "sessions.html", sessions=rows, metrics=metrics, live=live)

    def of_session(template: str, build: Callable[[sa.Connection, queries.Row], dict[str, Any]]) -> Endpoint:
        """A page of one session: 404 unless the projections know it, reloading while it runs."""

        def endpoint(request: Request) -> Response:
            session_id = request.path_params["session_id"]
            with engine.connect() as conn:
                session = queries.session(conn, session_id)
                if session is None:
                    return PlainTextResponse(f"no session {session_id!r} in the projections", status_code=404)
                context = build(conn, session)
            return page(request, template, session=session, live=session.state == queries.RUNNING, **context)

        return endpoint

    def rejected_page(request: Request) -> Response:
        session_id = request.query_params.get("session") or None
        with engine.connect() as conn:
            by_reason = queries.rejected_by_reason(conn, session_id)
            records = queries.rejected(conn, session_id, REJECTED_SHOWN)
        return page(
            request,
            "rejected.html",
            session_id=session_id,
            by_reason=by_reason,
            records=records,
            shown=REJECTED_SHOWN,
            live=False,
        )

    static = resources.files("roundlog.ui") / "static"
    routes = [
        Route("/", sessions_page, name="sessions"),
        Route("/sessions/{session_id}", of_session("session.html", _session_context), name="session"),
        Route(
            "/sessions/{session_id}/participation",
            of_session("participation.html", _participation_context),
            name="participation",
        ),
        Route("/rejected", rejected_page, name="rejected"),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ]
    middleware = [] if not token else [Middleware(BaseHTTPMiddleware, dispatch=_bearer_only(token))]
    app = Starlette(routes=routes, middleware=middleware)
    # links as paths, not absolute URLs: right behind a proxy that serves the dashboard elsewhere
    environment.globals["path_for"] = app.url_path_for
    return app


def _session_context(conn: sa.Connection, session: queries.Row) -> dict[str, Any]:
    rounds = queries.rounds(conn, session.session_id)
    curves = queries.curves(conn, session.session_id, rounds)
    return {
        "rounds": rounds,
        "bars": queries.timeline(rounds, session.started_at),
        "counts": queries.update_counts(conn, session.session_id),
        "lineage": queries.lineage(conn, session.session_id),
        "curves": curves,
        "chart_data": json.dumps({"x": curves.round_nos, "charts": [asdict(c) for c in curves.charts]}),
    }


def _participation_context(conn: sa.Connection, session: queries.Row) -> dict[str, Any]:
    grid = queries.participation(conn, session.session_id, queries.rounds(conn, session.session_id))
    return {"grid": grid, "totals": queries.client_totals(conn, grid.clients)}


Endpoint = Callable[[Request], Response]
Dispatch = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]


def _bearer_only(token: str) -> Dispatch:
    """Let through requests that bear ``token`` (header or cookie); ``?token=`` sets the cookie."""
    expected = token.encode()

    def bears(given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), expected)

    async def dispatch(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        header = request.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        if bears(request.query_params.get("token")):
            # keep the token out of the address bar (and of bookmarks): a cookie carries it from now on
            response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        if (scheme.lower() == "bearer" and bears(credentials)) or bears(request.cookies.get(TOKEN_COOKIE)):
            return await call_next(request)
        return PlainTextResponse(
            "this dashboard needs its token: Authorization: Bearer TOKEN, or open /?token=TOKEN once",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    return dispatch


# --- template filters ------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _moment(value: datetime | None) -> str:
    return "" if value is None else f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _short(value: str | None) -> str:
    """A UUID to its first 8 characters, as ``roundlog tail`` shows ids; other names stay whole."""
    if value is None:
        return ""
    return value[:8] if len(value) == 36 and value[8] == "-" else value


def _metric(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
