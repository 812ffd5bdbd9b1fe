"""A room's room-wide events between media nodes, over the bus channel `room:<name>`.

Every node hosting the room subscribes to the channel and publishes, for its own participants: joins and changes
(ParticipantInfo with tracks and mute state, plus how to relay each track), leaves, data packets, speaker changes
and track subscriptions; and every `ROSTER_INTERVAL` a roster of its participants, which is both its liveness signal
in the room and the repair of lost messages (a receiver that lacks some state asks that node for a snapshot; a
participant missing from its node's roster is gone). A node silent for `ROSTER_TIMEOUT` while the bus works (this
node hears its own rosters) is considered gone with all its participants.

Nothing here blocks the media path: events are queued and published by one task; a bus failure drops them and,
once the bus is back, every node re-announces its full state.
"""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf.message import DecodeError
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import cluster_pb2

from .relayed import track_spec
from .remote import RemoteView
from ..interfaces import Cluster, Participant, Room


log = logging.getLogger(__name__)

ROSTER_INTERVAL = 2.0
ROSTER_TIMEOUT = 7.0
SEED_TIMEOUT = 2 * ROSTER_INTERVAL + 1.0  # a participant only the store knew, not confirmed by any roster
OUT_QUEUE = 4096
STORE_TIMEOUT = 2.0
FLUSH_TIMEOUT = 1.0


class RoomLink:
    def __init__(self, cluster: Cluster, room: Room):
        self.cluster = cluster
        self.room = room
        self.channel = f"room:{room.name}"
        self.remote = RemoteView(self)
        self.peers: dict[str, float] = {}  # node id → when it was last heard in this room
        self.own_heard = 0.0  # our own roster came back: the bus works
        self.healthy_since = time.monotonic()
        self.dropped = 0
        self._out: asyncio.Queue[bytes] = asyncio.Queue(OUT_QUEUE)
        self._publish_failing = False
        self._tasks: list[asyncio.Task] = []
        self._sub = None
        self.closed = False

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Seed the remote participants from the store (so the first JoinResponse lists them), then join the bus."""
        try:
            stored = await asyncio.wait_for(self.cluster.store.list_participants(self.room.name), STORE_TIMEOUT)
        except Exception as exc:
            log.warning("%s: cannot read participants from the store: %r", self.room.name, exc)
            stored = []
        local = {p.identity for p in self.room.participants.values()}
        self.remote.seed([p for p in stored if p.identity not in local])
        name = self.room.name
        self._tasks = [
            asyncio.create_task(self._read(), name=f"room-bus-read-{name}"),
            asyncio.create_task(self._write(), name=f"room-bus-write-{name}"),
            asyncio.create_task(self._roster_loop(), name=f"room-roster-{name}"),
        ]

    async def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + FLUSH_TIMEOUT  # the last leaves, so the other nodes need not time them out
        while not self._out.empty() and not self._publish_failing and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sub is not None:
            try:
                await asyncio.wait_for(self._sub.close(), 1.0)
            except Exception:
                pass
        self.remote.close()
        if self.room.participants:
            return
        # Tell the others this node no longer hosts the room (best effort: the roster timeout covers a failure).
        try:
            await asyncio.wait_for(self.cluster.bus.publish(self.channel, self._event(
                roster=cluster_pb2.Roster()).SerializeToString()), 1.0)
        except Exception:
            pass

    # --- publishing --------------------------------------------------------------------------------------------

    def _event(self, **kwargs) -> cluster_pb2.RoomEvent:
        return cluster_pb2.RoomEvent(node_id=self.cluster.node_id, node_address=self.cluster.address, **kwargs)

    def _enqueue(self, event: cluster_pb2.RoomEvent) -> None:
        if self.closed:
            return
        try:
            self._out.put_nowait(event.SerializeToString())
        except asyncio.QueueFull:
            self.dropped += 1

    def has_peers(self) -> bool:
        return bool(self.peers) or bool(self.remote.by_identity)

    def _state(self, p: Participant) -> cluster_pb2.RoomEvent:
        specs = [track_spec(t) for t in p.publisher.tracks.values()]
        return self._event(participant=cluster_pb2.ParticipantState(
            info=p.info().SerializeToString(), tracks=specs,
            subscription_permission=p.publisher.access.to_proto().SerializeToString()))

    def local_joined(self, p: Participant) -> None:
        self.remote.local_joined(p.identity, p.sid)
        self._enqueue(self._state(p))

    def local_changed(self, p: Participant) -> None:
        self._enqueue(self._state(p))

    def local_left(self, info: models.ParticipantInfo) -> None:
        self._enqueue(self._event(left=cluster_pb2.ParticipantGone(info=info.SerializeToString())))

    def data(self, packet: bytes, reliable: bool, destinations: list[str]) -> None:
        """A data packet from a local participant; sent on only when some destination may be elsewhere."""
        if not self.has_peers():
            return
        if destinations and all(self.room.by_identity(i) is not None for i in destinations):
            return
        self._enqueue(self._event(data=cluster_pb2.DataRelay(packet=packet, reliable=reliable,
                                                             destinations=destinations)))

    def speakers(self, changed: list[models.SpeakerInfo]) -> None:
        if self.has_peers():
            self._enqueue(self._event(speakers=cluster_pb2.SpeakersRelay(
                speakers=rtc_pb.SpeakersChanged(speakers=changed).SerializeToString())))

    def track_subscribed(self, publisher_identity: str, track_sid: str) -> None:
        self._enqueue(self._event(track_subscribed=cluster_pb2.TrackSubscribedRelay(
            publisher_identity=publisher_identity, track_sid=track_sid)))

    def announce_all(self) -> None:
        """Our full state (after joining the bus, on request, after the bus came back)."""
        for p in list(self.room.participants.values()):
            if not p.closed:
                self._enqueue(self._state(p))
        self._enqueue(self._roster())

    def request_snapshot(self, node_id: str = "") -> None:
        self._enqueue(self._event(snapshot=cluster_pb2.SnapshotRequest(target_node_id=node_id)))

    def _roster(self) -> cluster_pb2.RoomEvent:
        live = [p for p in self.room.participants.values() if not p.closed]
        return self._event(roster=cluster_pb2.Roster(versions={p.sid: p.version for p in live},
                                                     scores={p.sid: p.quality.score for p in live}))

    async def _write(self) -> None:
        bus = self.cluster.bus
        while True:
            data = await self._out.get()
            try:
                await bus.publish(self.channel, data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._publish_failing:
                    log.warning("%s: bus publish failed (%r); events are dropped until it is back", self.room.name,
                                exc)
                self._publish_failing = True
                self.dropped += 1 + self._out.qsize()
                while not self._out.empty():  # stale by the time the bus is back: a resync replaces them
                    self._out.get_nowait()
                continue
            if self._publish_failing:
                self._publish_failing = False
                log.info("%s: bus publish works again; re-announcing", self.room.name)
                self.request_snapshot()
                self.announce_all()

    async def _roster_loop(self) -> None:
        while True:
            await asyncio.sleep(ROSTER_INTERVAL)
            self._enqueue(self._roster())
            now = time.monotonic()
            if now - self.own_heard < 2 * ROSTER_INTERVAL:
                for rp in self.remote.expire(now, self.healthy_since, ROSTER_TIMEOUT, SEED_TIMEOUT):
                    self.cluster.forget_remote(self.room, rp)
            for node_id in [n for n, seen in self.peers.items() if now - seen > ROSTER_TIMEOUT]:
                del self.peers[node_id]

    # --- receiving ---------------------------------------------------------------------------------------------

    async def _read(self) -> None:
        delay = 0.5
        while self._sub is None:
            try:
                self._sub = await self.cluster.bus.subscribe(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: cannot subscribe to the bus: %r", self.room.name, exc)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
        self.request_snapshot()
        self.announce_all()
        async for data in self._sub:
            try:
                self._on_message(data)
            except Exception:
                log.exception("%s: bus event failed", self.room.name)

    def _on_message(self, data: bytes) -> None:
        try:
            event = cluster_pb2.RoomEvent.FromString(data)
        except DecodeError:
            return
        kind = event.WhichOneof("event")
        now = time.monotonic()
        if event.node_id == self.cluster.node_id:
            if kind == "roster":
                if now - self.own_heard > 2 * ROSTER_INTERVAL:
                    self.healthy_since = now  # back after an outage: give the others time to be heard again
                self.own_heard = now
            return
        self.peers[event.node_id] = now
        remote = self.remote
        if kind == "participant":
            info = models.ParticipantInfo.FromString(event.participant.info)
            remote.apply_state(event.node_id, event.node_address, info, list(event.participant.tracks),
                               event.participant.subscription_permission)
        elif kind == "left":
            remote.apply_gone(event.node_id, models.ParticipantInfo.FromString(event.left.info))
        elif kind == "data":
            packet = models.DataPacket.FromString(event.data.packet)
            self.room.relay_data(None, packet, event.data.reliable, list(event.data.destinations))
        elif kind == "speakers":
            remote.apply_speakers(list(rtc_pb.SpeakersChanged.FromString(event.speakers.speakers).speakers))
        elif kind == "roster":
            if not event.roster.versions:
                self.peers.pop(event.node_id, None)  # that node stopped hosting the room
            if remote.apply_roster(event.node_id, event.node_address, dict(event.roster.versions)):
                self.request_snapshot(event.node_id)
            remote.apply_scores(event.node_id, dict(event.roster.scores))
        elif kind == "snapshot":
            if event.snapshot.target_node_id in ("", self.cluster.node_id):
                self.announce_all()
        elif kind == "track_subscribed":
            self._on_track_subscribed(event.track_subscribed)

    def _on_track_subscribed(self, event: cluster_pb2.TrackSubscribedRelay) -> None:
        publisher = self.room.by_identity(event.publisher_identity)
        if publisher is None:
            return
        track = publisher.publisher.tracks.get(event.track_sid)
        if track is not None and not track.subscribed_notified:
            track.subscribed_notified = True
            publisher.send(rtc_pb.SignalResponse(track_subscribed=rtc_pb.TrackSubscribed(track_sid=track.sid)))

    def tick(self, now: float) -> None:
        self.remote.tick(now)
