"""`/healthz` (the process is alive) and `/readyz` (it can take work now): two separate answers."""

from __future__ import annotations

from typing import Callable

from aiohttp import web


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
    """`GET /metrics` in the Prometheus text format: gauges from `collect()` (name → value)."""

    async def metrics(request: web.Request) -> web.Response:
        lines = []
        for name, value in sorted(collect().items()):
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {float(value):g}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", metrics)
