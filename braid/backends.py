"""Pick the store, registry and bus: in-memory for the single-process dev mode, Redis for a cluster."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from braid.shared.agents import AgentStore, MemoryAgentStore
from braid.shared.bus import Bus, MemoryBus
from braid.shared.config import Config
from braid.shared.store import MemoryRegistry, MemoryStore, NodeRegistry, RoomStore


@dataclass
class Backends:
    store: RoomStore
    registry: NodeRegistry
    bus: Bus
    agents: AgentStore = field(default_factory=MemoryAgentStore)
    redis: Any = None  # the Redis client in a cluster (the webhook outbox lives there too)

    async def healthy(self, timeout: float | None = None) -> bool:
        ping = getattr(self.store, "ping", None)
        if ping is None:
            return True
        try:
            return bool(await asyncio.wait_for(ping(), timeout))
        except Exception:
            return False

    async def close(self) -> None:
        await self.bus.close()
        await self.registry.close()
        await self.store.close()


def make_backends(config: Config) -> Backends:
    if config.redis.enabled:
        from braid.shared.redis_backend import redis_backends

        return redis_backends(config.redis)
    return Backends(store=MemoryStore(), registry=MemoryRegistry(), bus=MemoryBus(), agents=MemoryAgentStore())
