"""The room directory: creating rooms with the configured defaults, and closing them."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from livekit.protocol import models, webhook
from livekit.protocol import room as room_pb

from braid.shared import ids
from braid.shared.config import RoomConfig
from braid.shared.serverinfo import ENABLED_CODECS
from braid.shared.store import RoomStore
from braid.shared.webhooks import flush_events

log = logging.getLogger(__name__)

MAX_ROOM_NAME = 256


class RoomListener(Protocol):
    """Told when a room starts or finishes (the agent dispatcher)."""

    async def room_started(self, room: models.Room, config: room_pb.RoomConfiguration | None) -> None: ...

    async def room_finished(self, room: str) -> None: ...


class RoomDirectory:
    def __init__(self, store: RoomStore, defaults: RoomConfig, notifier):
        self.store = store
        self.defaults = defaults
        self.notifier = notifier
        self.listeners: list[RoomListener] = []

    def new_room(
        self,
        name: str,
        *,
        empty_timeout: int = 0,
        departure_timeout: int = 0,
        max_participants: int = 0,
        metadata: str = "",
    ) -> models.Room:
        now_ms = int(time.time() * 1000)
        return models.Room(
            sid=ids.room_sid(),
            name=name,
            empty_timeout=empty_timeout or self.defaults.empty_timeout,
            departure_timeout=departure_timeout or self.defaults.departure_timeout,
            max_participants=max_participants or self.defaults.max_participants,
            creation_time=now_ms // 1000,
            creation_time_ms=now_ms,
            metadata=metadata,
            enabled_codecs=[models.Codec(mime=mime) for mime in ENABLED_CODECS],
        )

    async def ensure(self, room: models.Room,
                     config: room_pb.RoomConfiguration | None = None) -> tuple[models.Room, bool]:
        """Create `room` unless it exists; a new room announces `room_started`. `config` is the room
        configuration of the token whose join creates it."""
        stored, created = await self.store.create_room(room)
        if created:
            log.info("room started: %s (%s)", stored.name, stored.sid)
            self.notifier.notify(webhook.WebhookEvent(event="room_started", room=stored))
            await flush_events(self.notifier)
            for listener in self.listeners:
                try:
                    await listener.room_started(stored, config)
                except Exception:
                    log.exception("room_started listener failed for %s", stored.name)
        return stored, created

    async def finish(self, name: str, reason: str) -> models.Room | None:
        """Remove a room from the directory and announce `room_finished` once."""
        room = await self.store.get_room(name)
        if room is None or not await self.store.delete_room(name):
            return None
        log.info("room finished: %s (%s): %s", room.name, room.sid, reason)
        self.notifier.notify(webhook.WebhookEvent(event="room_finished", room=room))
        await flush_events(self.notifier)
        for listener in self.listeners:
            try:
                await listener.room_finished(room.name)
            except Exception:
                log.exception("room_finished listener failed for %s", room.name)
        return room


def validate_room_name(name: str) -> str | None:
    if not name:
        return "room name is required"
    if len(name) > MAX_ROOM_NAME:
        return f"room name is longer than {MAX_ROOM_NAME} characters"
    return None
