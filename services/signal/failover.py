"""What the signal edge does when a media node or a router fails under it.

* A node that refused or broke a session is avoided in placements for `AVOID_FOR` seconds: a killed node stays in
  the registry until its heartbeat TTL expires, and the router would otherwise keep choosing it.
* A participant whose media node broke its session mid-call is told to reconnect (`leave` with action RECONNECT):
  the SDK rejoins from scratch through an edge and lands on a live node.
* Routers register in the registry (role "router"); the edge keeps their addresses (and the configured one, a seed
  for a registry that has none yet), sticks to one, and moves on to the next when a call finds it unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

import grpc
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import router_pb2_grpc
from braid.shared.rpc import Channels
from braid.shared.store import NodeRegistry

log = logging.getLogger(__name__)

AVOID_FOR = 15.0
ROUTER_REFRESH = 2.0
T = TypeVar("T")

RECONNECT = rtc_pb.SignalResponse(leave=rtc_pb.LeaveRequest(
    can_reconnect=True, reason=models.DisconnectReason.MIGRATION, action=rtc_pb.LeaveRequest.RECONNECT,
)).SerializeToString()


class FailedNodes:
    def __init__(self, avoid_for: float = AVOID_FOR):
        self.avoid_for = avoid_for
        self._until: dict[str, float] = {}

    def add(self, node_id: str) -> None:
        if node_id:
            self._until[node_id] = time.monotonic() + self.avoid_for

    def avoid(self) -> list[str]:
        now = time.monotonic()
        for node_id in [n for n, until in self._until.items() if until <= now]:
            del self._until[node_id]
        return list(self._until)


class Routers:
    """The routers this edge can reach: found in the registry, seeded by the configured address."""

    def __init__(self, registry: NodeRegistry | None, channels: Channels, seed: str = "",
                 refresh: float = ROUTER_REFRESH):
        self.registry = registry
        self.channels = channels
        self.seed = seed
        self.refresh = refresh
        self.failed = FailedNodes()  # keyed by address: a killed router stays registered until its TTL expires
        self._registered: list[str] = []
        self._current = seed
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.registry is not None:
            self._task = asyncio.create_task(self._refresh_loop(), name="router-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _refresh_loop(self) -> None:
        while True:
            await self._discover()
            await asyncio.sleep(self.refresh)

    async def _discover(self) -> None:
        if self.registry is None:
            return
        try:
            nodes = await asyncio.wait_for(self.registry.nodes("router"), self.refresh)
            self._registered = sorted(n.address for n in nodes if n.state == "SERVING")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the registry is away: keep the routers known so far
            log.debug("router discovery failed: %r", exc)

    def addresses(self) -> list[str]:
        """Routers to try, in order: the one in use, the others registered, the seed; failed ones last."""
        known = [self._current, *self._registered, self.seed]
        ordered = list(dict.fromkeys(a for a in known if a))
        avoid = set(self.failed.avoid())
        return [a for a in ordered if a not in avoid] + [a for a in ordered if a in avoid]

    async def call(self, send: Callable[[router_pb2_grpc.RouterStub], Awaitable[T]]) -> T:
        """`send` to a router; one found unreachable is avoided for a while and the next is tried."""
        last: grpc.aio.AioRpcError | None = None
        tried: set[str] = set()
        for attempt in range(2):
            if attempt:  # every router known failed: the registry may know one started since the last look
                await self._discover()
            for address in [a for a in self.addresses() if a not in tried]:
                tried.add(address)
                try:
                    result = await send(self.channels.router(address))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    log.warning("router %s unreachable: %s", address, exc.details())
                    self.failed.add(address)
                    last = exc
                    continue
                self._current = address
                return result
        if last is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="no router known")
        raise last
