"""A thin wrapper over `rtc.Room` that records what a participant sees: the tests' and benchmark's client."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from livekit import api, rtc

from .media import Received, collect_audio, collect_video


def join_token(api_key: str, api_secret: str, room: str, identity: str, *, name: str = "", metadata: str = "",
               ttl: float = 3600, **grants) -> str:
    token = (
        api.AccessToken(api_key, api_secret)
        .with_identity(identity)
        .with_ttl(_timedelta(ttl))
        .with_grants(api.VideoGrants(room_join=True, room=room, **grants))
    )
    if name:
        token = token.with_name(name)
    if metadata:
        token = token.with_metadata(metadata)
    return token.to_jwt()


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


@dataclass
class Observer:
    """One connected SDK participant and everything it observed."""

    identity: str
    room: rtc.Room = field(default_factory=rtc.Room)
    received: dict[str, Received] = field(default_factory=dict)  # remote identity → media
    data: list[rtc.DataPacket] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (event, detail)
    disconnect_reason: object = None
    # Off: no stream of ours on subscribed video/audio, for a test that reads them itself (the SDK hands a frame's
    # packet-trailer metadata to the first of a track's streams only; a second one gets none).
    collect_media: bool = True
    connect_seconds: float = 0.0
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        room = self.room
        room.on("track_subscribed", self._on_track)
        room.on("data_received", self.data.append)
        room.on("participant_connected", lambda p: self.events.append(("participant_connected", p.identity)))
        room.on("participant_disconnected", lambda p: self.events.append(("participant_disconnected", p.identity)))
        room.on("track_unpublished", lambda pub, p: self.events.append(("track_unpublished", pub.sid)))
        room.on("track_published", lambda pub, p: self.events.append(("track_published", pub.sid)))
        room.on("track_unsubscribed", lambda track, pub, p: self.events.append(("track_unsubscribed", pub.sid)))
        room.on("track_muted", lambda p, pub: self.events.append(("track_muted", pub.sid)))
        room.on("track_unmuted", lambda p, pub: self.events.append(("track_unmuted", pub.sid)))
        room.on("participant_metadata_changed",
                lambda p, old, new: self.events.append(("metadata", f"{p.identity}={new}")))
        room.on("room_metadata_changed", lambda old, new: self.events.append(("room_metadata", new)))
        room.on("active_speakers_changed",
                lambda speakers: self.events.append(("speakers", ",".join(p.identity for p in speakers))))
        room.on("connection_quality_changed",
                lambda p, quality: self.events.append(("connection_quality", f"{p.identity}={quality.name}")))
        room.on("disconnected", self._on_disconnected)

    def _on_disconnected(self, reason) -> None:
        self.disconnect_reason = reason
        self.events.append(("disconnected", str(reason)))

    def _on_track(self, track: rtc.Track, pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant):
        self.events.append(("track_subscribed", pub.sid))
        if not self.collect_media:
            return
        got = self.received.setdefault(participant.identity, Received())
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self._tasks.append(asyncio.create_task(collect_audio(track, got, self._stop)))
        else:
            self._tasks.append(asyncio.create_task(collect_video(track, got, self._stop)))

    async def connect(self, url: str, token: str, **options) -> None:
        started = time.monotonic()
        await self.room.connect(url, token, rtc.RoomOptions(**options))
        self.connect_seconds = time.monotonic() - started

    def quality_of(self, identity: str) -> str:
        """The last connection quality the server reported for `identity` ("" before any)."""
        for event, detail in reversed(self.events):
            if event == "connection_quality" and detail.startswith(identity + "="):
                return detail.split("=", 1)[1]
        return ""

    def saw(self, event: str, detail: str | None = None) -> bool:
        return any(e == event and (detail is None or d == detail) for e, d in self.events)

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.room.disconnect(), 5)
        except Exception:
            pass


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
