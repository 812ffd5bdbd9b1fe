"""Room-wide events between nodes. `MemoryBus` for one process; the Redis bus for a cluster."""

from __future__ import annotations

import abc
import asyncio
from collections import defaultdict
from typing import AsyncIterator


class Subscription(abc.ABC):
    """Messages of one channel, in publish order, until closed."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Bus(abc.ABC):
    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> Subscription: ...

    async def close(self) -> None:
        return None


class _MemorySubscription(Subscription):
    def __init__(self, bus: "MemoryBus", channel: str):
        self._bus = bus
        self._channel = channel
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def close(self) -> None:
        self._bus._subscribers[self._channel].discard(self)
        self.queue.put_nowait(None)


class MemoryBus(Bus):
    def __init__(self) -> None:
        self._subscribers: dict[str, set[_MemorySubscription]] = defaultdict(set)

    async def publish(self, channel: str, data: bytes) -> None:
        for sub in list(self._subscribers.get(channel, ())):
            sub.queue.put_nowait(data)

    async def subscribe(self, channel: str) -> Subscription:
        sub = _MemorySubscription(self, channel)
        self._subscribers[channel].add(sub)
        return sub
