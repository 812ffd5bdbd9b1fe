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
