"""Lifecycle events of the media node, for webhooks and telemetry.

`Hooks` is the seam: the media node calls it and never the notifier directly.
* `TelemetryHooks` (the node's default) drives `telemetry.TelemetryService`: stats workers keyed by (room,
  participant) with one reference guard per holder: the participant session, and each signal connection (one
  `Session` stream); webhooks follow its rules (participant_joined on ACTIVE, participant_left exactly once).
* `WebhookHooks` sends the same webhooks without stats workers (tests, tools).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

from livekit.protocol import models, webhook
from livekit.protocol.models import DisconnectReason

from braid.shared.webhooks import flush_events, participant_ended_events

MIGRATION = DisconnectReason.MIGRATION

from .interfaces import Participant, Room

if TYPE_CHECKING:
    from .publisher import PublishedTrack

log = logging.getLogger(__name__)


class Hooks(Protocol):
    def participant_joined(self, room: Room, participant: Participant) -> None: ...

    def participant_active(self, room: Room, participant: Participant) -> None: ...

    def participant_left(self, room: Room, participant: Participant, reason: int) -> None: ...

    def participant_resumed(self, room: Room, participant: Participant) -> None: ...

    def track_published(self, room: Room, participant: Participant, track: PublishedTrack) -> None: ...

    def track_unpublished(self, room: Room, participant: Participant, track: PublishedTrack) -> None: ...

    def track_subscribed(self, room: Room, participant: Participant, track: PublishedTrack) -> None: ...

    def signal_attached(self, room: Room, participant: Participant, guard) -> None: ...

    def signal_detached(self, room: Room, participant: Participant, guard) -> None: ...

    def stats_worker(self, room: Room, participant: Participant): ...

    def participant_gone(self, room: models.Room, info: models.ParticipantInfo, reason: int) -> None:
        """A participant hosted elsewhere ended here (this node removed its record): its final webhook."""

    async def flush(self) -> None:
        """Until the webhooks of every event so far are in the outbox (before the change they report is stored)."""


class TelemetryHooks:
    def __init__(self, telemetry):
        self.telemetry = telemetry

    def participant_joined(self, room: Room, participant: Participant) -> None:
        self.telemetry.participant_joined(room.info(), participant.info(), participant.guard, send_event=True)

    def participant_active(self, room: Room, participant: Participant) -> None:
        self.telemetry.participant_active(room.info(), participant.info(), participant.guard,
                                          is_migration=participant.migrated)

    def participant_left(self, room: Room, participant: Participant, reason: int) -> None:
        # A participant moved to another node has not left: that node sends its participant_left later.
        self.telemetry.participant_left(room.info(), participant.info(), participant.guard,
                                        send_event=reason != MIGRATION, reason=reason)

    def participant_resumed(self, room: Room, participant: Participant) -> None:
        self.telemetry.participant_resumed(room.info(), participant.info())

    def track_published(self, room: Room, participant: Participant, track: PublishedTrack) -> None:
        self.telemetry.track_published(room.info(), participant.info(), track.info)

    def track_unpublished(self, room: Room, participant: Participant, track: PublishedTrack) -> None:
        self.telemetry.track_unpublished(room.info(), participant.info(), track.info)

    def track_subscribed(self, room: Room, participant: Participant, track: PublishedTrack) -> None:
        self.telemetry.track_subscribed(room.info(), participant.info(), track.info)

    def signal_attached(self, room: Room, participant: Participant, guard) -> None:
        self.telemetry.participant_joined(room.info(), participant.info(), guard, send_event=False)

    def signal_detached(self, room: Room, participant: Participant, guard) -> None:
        self.telemetry.participant_left(room.info(), participant.info(), guard, send_event=False)

    def stats_worker(self, room: Room, participant: Participant):
        return self.telemetry.worker(room.name, participant.sid)

    def participant_gone(self, room: models.Room, info: models.ParticipantInfo, reason: int) -> None:
        if self.telemetry.notifier is not None:
            for event in participant_ended_events(room, info, reason):
                self.telemetry.notifier.notify(event)

    async def flush(self) -> None:
        await self.telemetry.drain()
        await flush_events(self.telemetry.notifier)


class WebhookHooks:
    def __init__(self, notifier):
        self.notifier = notifier
        self._active: set[str] = set()

    def _send(self, name: str, room: Room, participant: Participant | None = None,
              track: PublishedTrack | None = None) -> None:
        if self.notifier is None:
            return
        event = webhook.WebhookEvent(event=name, created_at=int(time.time()))
        event.room.CopyFrom(room.info())
        if participant is not None:
            event.participant.CopyFrom(participant.info())
        if track is not None:
            event.track.CopyFrom(track.info)
        try:
            self.notifier.notify(event)
        except Exception:
            log.exception("webhook notifier failed for %s", name)

    def participant_joined(self, room: Room, participant: Participant) -> None:
        return None

    def participant_active(self, room: Room, participant: Participant) -> None:
        if participant.migrated:
            self._active.add(participant.sid)
            return
        if participant.sid in self._active:
            return
        self._active.add(participant.sid)
        self._send("participant_joined", room, participant)

    def participant_left(self, room: Room, participant: Participant, reason: int) -> None:
        if reason == MIGRATION:
            self._active.discard(participant.sid)
            return
        if participant.sid in self._active:
            self._active.discard(participant.sid)
            self._send("participant_left", room, participant)
        else:
            self._send("participant_connection_aborted", room, participant)

    def participant_resumed(self, room: Room, participant: Participant) -> None:
        return None

    def track_published(self, room: Room, participant: Participant, track: PublishedTrack) -> None:
        self._send("track_published", room, participant, track)

    def track_unpublished(self, room: Room, participant: Participant, track: PublishedTrack) -> None:
        self._send("track_unpublished", room, participant, track)

    def track_subscribed(self, room: Room, participant: Participant, track: PublishedTrack) -> None:
        return None

    def signal_attached(self, room: Room, participant: Participant, guard) -> None:
        return None

    def signal_detached(self, room: Room, participant: Participant, guard) -> None:
        return None

    def stats_worker(self, room: Room, participant: Participant):
        return None

    def participant_gone(self, room: models.Room, info: models.ParticipantInfo, reason: int) -> None:
        if self.notifier is not None:
            for event in participant_ended_events(room, info, reason):
                self.notifier.notify(event)

    async def flush(self) -> None:
        await flush_events(self.notifier)

