"""What a signal edge needs to serve clients: config, keys, and stubs to the router and media nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from braid.shared.auth import KeyProvider
from braid.shared.config import Config
from braid.shared.health import Refusals
from braid.shared.rpc import Channels

from .failover import Routers

T = TypeVar("T")


@dataclass
class SignalContext:
    config: Config
    keys: KeyProvider
    channels: Channels
    node_id: str
    # Whether the node can take joins now (started, not draining, backends reachable).
    ready: Callable[[], bool] = field(default=lambda: True)
    # Registered routers (and the configured seed); without one given, the configured router alone.
    routers: Routers | None = None
    refusals: Refusals = field(default_factory=Refusals)  # what the edge's limits refused, for /metrics

    def __post_init__(self) -> None:
        if self.routers is None:
            self.routers = Routers(None, self.channels, self.config.router_address)

    async def call_router(self, send: Callable[..., Awaitable[T]]) -> T:
        """`send(router_stub)` to a reachable router, failing over to another registered one."""
        return await self.routers.call(send)

    def media(self, address: str):
        return self.channels.media(address)
