"""The signal edge's HTTP application: RoomService and AgentDispatchService (Twirp), `/rtc` signalling, `/agent`
workers, health, the meeting page."""

from __future__ import annotations

from aiohttp import web

from braid.shared.health import add_health_routes

from .agents import AgentHub, add_agent_routes
from .context import SignalContext
from .rtc import add_rtc_routes
from .twirp import add_twirp_routes
from .web import add_web_routes


def create_app(ctx: SignalContext, agent_hub: AgentHub | None = None) -> web.Application:
    # The Twirp handler enforces its own, smaller body limit with a Twirp error.
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app["ctx"] = ctx
    add_health_routes(app, ctx.ready)
    add_twirp_routes(app, ctx)
    add_rtc_routes(app, ctx)
    add_web_routes(app, ctx)
    if agent_hub is not None:
        add_agent_routes(app, agent_hub)
    return app
