"""Closing rooms nobody uses: `empty_timeout` before the first join, `departure_timeout` after the last leave.

Several routers may run; one at a time sweeps, the holder of the store lease `room-reaper` (renewed each sweep,
taken over by another router within `LEASE_TTL` when its holder dies). `RoomDirectory.finish` sends
`room_finished` only when its own delete removed the room, so even a sweep racing a DeleteRoom sends it once.
A router that takes the lease has not watched the rooms: it gives every room it finds empty the longer of its two
timeouts, counted from then, rather than closing a room whose last participant may have just left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from braid.shared import ids

from .dead_nodes import DeadNodes
from .rooms import RoomDirectory

log = logging.getLogger(__name__)

LEASE = "room-reaper"
LEASE_TTL = 5.0


class RoomReaper:
    def __init__(self, directory: RoomDirectory, interval: float = 1.0, clock: Callable[[], float] = time.time,
                 registry=None, owner: str = ""):
        self.directory = directory
        self.interval = interval
        self.clock = clock
        self.owner = owner or ids.node_id()
        self.dead_nodes = DeadNodes(directory.store, registry, directory.notifier) if registry is not None else None
        # room sid → when it was last seen with participants; rooms never occupied are absent.
        self._last_occupied: dict[str, float] = {}
        self._leader = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="room-reaper")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.sweep()
                failing = False
            except Exception as exc:
                if not failing:  # once per outage, not once a second
                    log.warning("room reaper sweep failed (%r); retrying", exc)
                failing = True
            await asyncio.sleep(self.interval)

    async def sweep(self) -> None:
        store = self.directory.store
        if not await store.try_lease(LEASE, self.owner, LEASE_TTL):
            if self._leader:
                log.info("room reaper: another router holds the lease")
            self._leader = False
            return
        bootstrap = not self._leader
        if bootstrap:
            self._leader = True
            self._last_occupied.clear()
            if self.dead_nodes is not None:
                self.dead_nodes.reset()
        now = self.clock()
        rooms = await store.list_rooms()
        seen = set()
        for room in rooms:
            seen.add(room.sid)
            if await store.list_participants(room.name):
                self._last_occupied[room.sid] = now
                continue
            if bootstrap:
                longer = max(room.empty_timeout, room.departure_timeout)
                self._last_occupied[room.sid] = now + max(0, longer - room.departure_timeout)
            last = self._last_occupied.get(room.sid)
            if last is None:
                if room.empty_timeout and now - room.creation_time_ms / 1000 >= room.empty_timeout:
                    await self.directory.finish(room.name, f"empty for {room.empty_timeout}s")
            elif now - last >= room.departure_timeout:
                await self.directory.finish(room.name, f"departure timeout {room.departure_timeout}s")
        for sid in list(self._last_occupied):
            if sid not in seen:
                del self._last_occupied[sid]
        if self.dead_nodes is not None:
            await self.dead_nodes.sweep(rooms)
