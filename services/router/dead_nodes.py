"""Rooms left behind by media nodes that died (kill -9, lost host): their claims and their participants.

A media node that stops heartbeating drops out of the registry when its TTL expires. Once a node has been missing
for `grace` seconds (as seen by the reaper holding the lease: a short Redis blip or restart does not count), its
claims on rooms are released (compare-and-delete on its own entry), and in a room no live node hosts any more, the
participants still listed are removed, each with one `participant_left` webhook (whoever removes a participant
sends it, so it is sent once cluster-wide). In a room that still has live nodes, those nodes remove the dead
node's participants themselves (see media/cluster/events.py). A router's placement claim that no join followed
(the node refused it, the client gave up) is aged out after `PLACEMENT_CLAIM_TTL`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from livekit.protocol import models

from braid.shared.store import NodeRegistry, RoomStore, placement_claim_age
from braid.shared.webhooks import flush_events, participant_ended_events

log = logging.getLogger(__name__)

GRACE = 10.0
PLACEMENT_CLAIM_TTL = 30.0


class DeadNodes:
    def __init__(self, store: RoomStore, registry: NodeRegistry, notifier, grace: float = GRACE,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.registry = registry
        self.notifier = notifier
        self.grace = grace
        self.clock = clock
        self._missing_since: dict[str, float] = {}

    def reset(self) -> None:
        """Forget what was observed (this router lost the lease, or just took it)."""
        self._missing_since.clear()

    async def sweep(self, rooms: list[models.Room]) -> None:
        now = self.clock()
        live = {n.node_id for n in await self.registry.nodes("media")}
        for room in rooms:
            claims = await self.store.room_nodes(room.name)
            dead = []
            for node_id, token in claims.items():
                if node_id in live:
                    self._missing_since.pop(node_id, None)
                    age = placement_claim_age(token, time.time())
                    if age is not None and age > PLACEMENT_CLAIM_TTL:
                        await self.store.release_room_node(room.name, node_id, token)
                    continue
                since = self._missing_since.setdefault(node_id, now)
                if now - since >= self.grace:
                    dead.append(node_id)
            if not dead:
                continue
            for node_id in dead:
                log.info("media node %s is gone: releasing its claim on room %s", node_id, room.name)
                await self.store.release_room_node(room.name, node_id, claims[node_id])
            if not set(claims) & live:
                await self._orphans(room)
        for node_id in [n for n in self._missing_since if n in live]:
            del self._missing_since[node_id]

    async def _orphans(self, room: models.Room) -> None:
        for info in await self.store.list_sessions(room.name):  # superseded sessions too: each ends once
            # The webhook is in the outbox before the record goes; its stable id makes a repeat (after a crash
            # here, or from another remover) the same event.
            for event in participant_ended_events(room, info, models.DisconnectReason.CONNECTION_TIMEOUT):
                self.notifier.notify(event)
            await flush_events(self.notifier)
            if await self.store.delete_participant(room.name, info.identity, info.sid):
                log.info("room %s: removed %s (%s), its media node is gone", room.name, info.identity, info.sid)
