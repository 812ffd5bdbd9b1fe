"""Telemetry events (for sinks) and webhook events (for the notifier), both built from protocol snapshots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from google.protobuf import json_format
from livekit.protocol import analytics, models, webhook

from braid.shared.ids import guid
from braid.shared.webhooks import stable_event_id

ANALYTICS_EVENT_PREFIX = "AE_"

# Webhook names, as `livekit/protocol` webhook/consts.go spells them.
ROOM_STARTED = "room_started"
ROOM_FINISHED = "room_finished"
PARTICIPANT_JOINED = "participant_joined"
PARTICIPANT_LEFT = "participant_left"
PARTICIPANT_CONNECTION_ABORTED = "participant_connection_aborted"
TRACK_PUBLISHED = "track_published"
TRACK_UNPUBLISHED = "track_unpublished"


@runtime_checkable
class WebhookNotifier(Protocol):
    """Delivers webhooks. `notify` must not block: the real notifier queues and sends in the background."""

    def notify(self, event: webhook.WebhookEvent) -> None: ...


def make_webhook(
    name: str,
    created_at: float,
    room: models.Room | None = None,
    participant: models.ParticipantInfo | None = None,
    track: models.TrackInfo | None = None,
) -> webhook.WebhookEvent:
    """A WebhookEvent with its stable id (see `webhooks.stable_event_id`) and `created_at` in Unix seconds."""
    ev = webhook.WebhookEvent(event=name, created_at=int(created_at))
    if room is not None:
        ev.room.CopyFrom(room)
    if participant is not None:
        ev.participant.CopyFrom(participant)
    if track is not None:
        ev.track.CopyFrom(track)
    ev.id = stable_event_id(ev)
    return ev


@dataclass(frozen=True)
class TelemetryEvent:
    """One analytics event (joined, active, resumed, left, track published/…), handed to every sink.

    `type` is the `livekit.protocol.analytics.AnalyticsEventType` name, e.g. "PARTICIPANT_JOINED".
    """

    type: str
    id: str
    timestamp: float
    room: models.Room
    participant: models.ParticipantInfo | None = None
    track: models.TrackInfo | None = None
    reason: str = ""  # DisconnectReason name for left / connection aborted

    @classmethod
    def create(cls, type_: int, timestamp: float, room: models.Room,
               participant: models.ParticipantInfo | None = None, track: models.TrackInfo | None = None,
               reason: str = "") -> TelemetryEvent:
        return cls(analytics.AnalyticsEventType.Name(type_), guid(ANALYTICS_EVENT_PREFIX), timestamp, room,
                   participant, track, reason)

    @property
    def participant_sid(self) -> str:
        return self.participant.sid if self.participant is not None else ""

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready form for the analytics stream."""
        d: dict[str, Any] = {
            "type": self.type, "id": self.id, "timestamp": self.timestamp,
            "room_id": self.room.sid, "room_name": self.room.name,
        }
        if self.participant is not None:
            d["participant_id"] = self.participant.sid
            d["identity"] = self.participant.identity
        if self.track is not None:
            d["track_id"] = self.track.sid
            d["track"] = json_format.MessageToDict(self.track, preserving_proto_field_name=True)
        if self.reason:
            d["reason"] = self.reason
        return d

    def to_proto(self) -> analytics.AnalyticsEvent:
        ev = analytics.AnalyticsEvent(
            id=self.id, type=analytics.AnalyticsEventType.Value(self.type), room_id=self.room.sid, room=self.room,
            participant_id=self.participant_sid, track_id=self.track.sid if self.track is not None else "",
        )
        ev.timestamp.FromNanoseconds(int(self.timestamp * 1e9))
        if self.participant is not None:
            ev.participant.CopyFrom(self.participant)
        if self.track is not None:
            ev.track.CopyFrom(self.track)
        return ev
