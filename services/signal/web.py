"""The demo meeting page (`/`, `/meet`) and, in dev mode only, the dev-token endpoint it joins with.

The page is built from `web/` by `scripts/build-web.sh` into `braid/web/meet/` and ships with the
package, so serving it needs no Node.js. `/dev/token` mints a join token with the first configured
API key; it is registered only when the server runs with `--dev`, so elsewhere it is a plain 404.
"""

from __future__ import annotations

import importlib.resources
import secrets
from pathlib import Path

from aiohttp import web

from braid.shared.auth import mint_token

from .context import SignalContext

PAGE_FILES = ("index.html", "meet.js", "meet.css")
MAX_NAME_LENGTH = 256
DEV_TOKEN_TTL_SECONDS = 6 * 3600


def meet_dir() -> Path:
    """Where the built page lives inside the installed `braid` package."""
    return Path(str(importlib.resources.files("braid").joinpath("web", "meet")))


def add_web_routes(app: web.Application, ctx: SignalContext) -> None:
    root = meet_dir()

    def page_file(name: str) -> Path | None:
        path = root / name
        return path if name in PAGE_FILES and path.is_file() else None

    async def index(request: web.Request) -> web.StreamResponse:
        path = page_file("index.html")
        if path is None:
            return web.Response(
                status=503,
                text="The meeting page is not built; run `make web-build` (scripts/build-web.sh).\n",
            )
        # The HTML is tiny and names the assets by fixed paths: always revalidate it.
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def asset(request: web.Request) -> web.StreamResponse:
        path = page_file(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", index)
    app.router.add_get("/meet", index)
    app.router.add_get("/meet/", index)
    app.router.add_get("/meet/{name}", asset)

    if ctx.config.dev:
        app.router.add_get("/dev/token", _dev_token_handler(ctx))


def _dev_token_handler(ctx: SignalContext):
    async def dev_token(request: web.Request) -> web.Response:
        room = request.query.get("room", "").strip()
        identity = request.query.get("identity", "").strip()
        name = request.query.get("name", "").strip()
        if not room:
            return _json_error(400, "room is required")
        if max(len(room), len(identity), len(name)) > MAX_NAME_LENGTH:
            return _json_error(400, f"room, identity and name are limited to {MAX_NAME_LENGTH} characters")
        if not identity:
            identity = "guest-" + secrets.token_hex(3)

        api_key, api_secret = ctx.keys.first()
        token = mint_token(
            api_key,
            api_secret,
            identity=identity,
            name=name,
            ttl_seconds=DEV_TOKEN_TTL_SECONDS,
            video={
                "roomJoin": True,
                "room": room,
                "canPublish": True,
                "canSubscribe": True,
                "canPublishData": True,
            },
        )
        return web.json_response(
            {"token": token, "url": _ws_url(request)},
            headers={"Cache-Control": "no-store"},
        )

    return dev_token


def _ws_url(request: web.Request) -> str:
    """The WebSocket URL a browser that reached us at `request.host` should use."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    secure = request.secure or forwarded == "https"
    return f"{'wss' if secure else 'ws'}://{request.host}"


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
