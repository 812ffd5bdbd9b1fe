"""`/healthz` (the process is alive) and `/readyz` (it can take work now): two separate answers."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from aiohttp import web

log = logging.getLogger(__name__)


class Refusals:
    """How often each limit refused something on this node (`braid_limit_<name>_refused_total`)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def count(self, limit: str) -> bool:
        """Count one refusal; True when it is worth a log line (the 1st, 2nd, 4th, 8th… of its kind)."""
        self.counts[limit] += 1
        n = self.counts[limit]
        return n & (n - 1) == 0

    def metrics(self) -> dict[str, float]:
        return {f"braid_limit_{name}_refused_total": float(n) for name, n in self.counts.items()}


def add_health_routes(app: web.Application, ready: Callable[[], bool]) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready")
        return web.Response(status=503, text="not ready")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def health_app(ready: Callable[[], bool]) -> web.Application:
    app = web.Application()
    add_health_routes(app, ready)
    return app


def add_metrics_route(app: web.Application, collect: Callable[[], dict[str, float]]) -> None:
    """`GET /metrics` in the Prometheus text format: `collect()` gives name → value; `…_total` are counters."""

    async def metrics(request: web.Request) -> web.Response:
        lines = []
        for name, value in sorted(collect().items()):
            lines.append(f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}")
            lines.append(f"{name} {float(value):g}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", metrics)


def add_drain_routes(app: web.Application, drain, keys) -> None:
    """`/admin/drain` on a media node: GET the status, POST to start a drain, DELETE to cancel it.

    Operators authenticate with `Authorization: Bearer <token>`, a token with a roomAdmin grant over every room
    (no `room` in it): a participant's join token, or an admin token scoped to one room, cannot drain a node.
    """
    from braid.shared.auth import AuthError, bearer_token, verify_admin_token

    def authorized(request: web.Request) -> web.Response | None:
        try:
            claims = verify_admin_token(bearer_token(request.headers.get("Authorization"), None), keys)
        except AuthError as exc:
            log.warning("%s %s refused (%s) from %s: %s", request.method, request.path, exc.status,
                        request.remote, exc)
            return web.json_response({"error": str(exc)}, status=exc.status)
        log.info("%s %s by %s (key %s)", request.method, request.path, claims.identity or "-", claims.api_key)
        return None

    async def status(request: web.Request) -> web.Response:
        return authorized(request) or web.json_response(drain.status())

    async def start(request: web.Request) -> web.Response:
        denied = authorized(request)
        if denied:
            return denied
        await drain.start()
        return web.json_response(drain.status(), status=202)

    async def cancel(request: web.Request) -> web.Response:
        denied = authorized(request)
        if denied:
            return denied
        cancelled = await drain.cancel()
        return web.json_response({**drain.status(), "cancelled": cancelled})

    app.router.add_get("/admin/drain", status)
    app.router.add_post("/admin/drain", start)
    app.router.add_delete("/admin/drain", cancel)
