"""Closing rooms nobody uses: `empty_timeout` before the first join, `departure_timeout` after the last leave."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from .rooms import RoomDirectory

log = logging.getLogger(__name__)


class RoomReaper:
    def __init__(self, directory: RoomDirectory, interval: float = 1.0, clock: Callable[[], float] = time.time):
        self.directory = directory
        self.interval = interval
        self.clock = clock
        # room sid → when it was last seen with participants; rooms never occupied are absent.
        self._last_occupied: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="room-reaper")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("room reaper sweep failed; retrying")
            await asyncio.sleep(self.interval)

    async def sweep(self) -> None:
        now = self.clock()
        store = self.directory.store
        rooms = await store.list_rooms()
        seen = set()
        for room in rooms:
            seen.add(room.sid)
            if await store.list_participants(room.name):
                self._last_occupied[room.sid] = now
                continue
            last = self._last_occupied.get(room.sid)
            if last is None:
                if room.empty_timeout and now - room.creation_time_ms / 1000 >= room.empty_timeout:
                    await self.directory.finish(room.name, f"empty for {room.empty_timeout}s")
            elif now - last >= room.departure_timeout:
                await self.directory.finish(room.name, f"departure timeout {room.departure_timeout}s")
        for sid in list(self._last_occupied):
            if sid not in seen:
                del self._last_occupied[sid]
