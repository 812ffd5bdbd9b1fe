"""Participants of a room hosted by other media nodes, as this node's Room sees them.

The `RemoteView` of a room is fed by its `RoomLink` (bus events). Remote participants appear to local participants
exactly like local ones: in the JoinResponse, in ParticipantUpdate broadcasts, in speaker updates, and with their
tracks subscribable (`RelayedTrack`s, fed by the node-to-node relay).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import cluster_pb2

from ..permissions import SubscriptionPermission
from ..publisher import PublishedTrack
from .relayed import RelayedTrack
from ..interfaces import RoomLink


log = logging.getLogger(__name__)

State = models.ParticipantInfo.State
Reason = models.DisconnectReason
UNWANTED_LINGER = 5.0  # a relayed track nobody here receives stops crossing after this long


@dataclass
class RemoteParticipant:
    info: models.ParticipantInfo
    node_id: str  # "" while only known from the store (not yet confirmed by its node)
    address: str
    seen: float
    tracks: dict[str, RelayedTrack] = field(default_factory=dict)
    specs: dict[str, cluster_pb2.RelayTrackSpec] = field(default_factory=dict)
    access: SubscriptionPermission = field(default_factory=SubscriptionPermission)
    score: float | None = None  # connection quality its node last reported

    @property
    def sid(self) -> str:
        return self.info.sid

    @property
    def identity(self) -> str:
        return self.info.identity

    @property
    def hidden(self) -> bool:
        return self.info.permission.hidden

    def __repr__(self) -> str:
        return f"{self.identity}({self.sid})@{self.node_id or '?'}"


class RemoteView:
    def __init__(self, link: RoomLink):
        self.link = link
        self.room = link.room
        self.by_identity: dict[str, RemoteParticipant] = {}
        self.speaking: dict[str, float] = {}  # remote participant sid → level last announced

    # --- what the Room asks -------------------------------------------------------------------------------------

    def infos(self) -> list[models.ParticipantInfo]:
        return [rp.info for rp in self.by_identity.values() if not rp.hidden]

    def count(self) -> tuple[int, int]:
        """(visible participants, publishers) hosted elsewhere."""
        visible = [rp for rp in self.by_identity.values() if not rp.hidden]
        return len(visible), sum(1 for rp in visible if rp.info.tracks)

    def find_track(self, track_sid: str) -> tuple[RemoteParticipant, PublishedTrack] | None:
        for rp in self.by_identity.values():
            relayed = rp.tracks.get(track_sid)
            if relayed is not None and not relayed.up.closed:
                return rp, relayed.published
        return None

    def published(self) -> Iterable[tuple[str, PublishedTrack]]:
        """(publisher sid, track) of every remote track a local participant may subscribe to."""
        for rp in list(self.by_identity.values()):
            if rp.hidden:
                continue
            for relayed in rp.tracks.values():
                if not relayed.up.closed:
                    yield rp.sid, relayed.published

    def identity_of_sid(self, sid: str) -> str | None:
        return next((rp.identity for rp in self.by_identity.values() if rp.sid == sid), None)

    def current_speakers(self) -> list[models.SpeakerInfo]:
        return [models.SpeakerInfo(sid=sid, level=level, active=True) for sid, level in self.speaking.items()]

    # --- from the store and the bus ---------------------------------------------------------------------------

    def seed(self, infos: list[models.ParticipantInfo]) -> None:
        """Participants the store lists for the room when this node starts hosting it (before the bus caught up)."""
        now = time.monotonic()
        for info in infos:
            if info.identity not in self.by_identity and info.state != State.DISCONNECTED:
                self.by_identity[info.identity] = RemoteParticipant(info, "", "", now)

    def apply_state(self, node_id: str, address: str, info: models.ParticipantInfo,
                    specs: list[cluster_pb2.RelayTrackSpec], permission: bytes = b"") -> None:
        room = self.room
        local = room.by_identity(info.identity)
        if local is not None:
            if local.sid == info.sid or getattr(local, "moving", False):
                pass  # the same participant, being moved to that node by a drain here: the drain removes it
            elif int(local.joined_at * 1000) >= info.joined_at_ms:
                return  # one identity on two nodes: the later join wins (that node removes its own on our event)
            else:
                log.info("%s joined again on %s; removing it here", local, node_id)
                room.schedule_remove(local, Reason.DUPLICATE_IDENTITY, send_leave=True)
        rp = self.by_identity.get(info.identity)
        if rp is not None and rp.sid != info.sid:
            if rp.node_id and info.joined_at_ms < rp.info.joined_at_ms:
                return  # an older incarnation, reported late
            self._drop(rp)
            rp = None
        if rp is not None and rp.node_id == node_id and info.version < rp.info.version:
            return  # out of order
        if rp is not None and rp.node_id and rp.node_id != node_id:
            for relayed in rp.tracks.values():  # moved to another node (same sid): relay from there
                self._close_track(relayed)
            rp.tracks.clear()
        now = time.monotonic()
        if rp is None:
            rp = RemoteParticipant(info, node_id, address, now)
            self.by_identity[info.identity] = rp
            log.info("%s: remote participant %s", room.name, rp)
        rp.info, rp.node_id, rp.address, rp.seen = info, node_id, address, now
        rp.specs = {spec.track_sid: spec for spec in specs}
        resolved = rtc_pb.SubscriptionPermission.FromString(permission) if permission else None
        permission_changed = rp.access.apply_proto(resolved or rtc_pb.SubscriptionPermission(all_participants=True))
        if not rp.hidden:
            room.broadcast(rtc_pb.SignalResponse(update=rtc_pb.ParticipantUpdate(participants=[info])))
        self._sync_tracks(rp)
        if permission_changed:
            room.recheck_permission(rp.sid, [relayed.published for relayed in rp.tracks.values()])

    def apply_gone(self, node_id: str, info: models.ParticipantInfo) -> None:
        rp = self.by_identity.get(info.identity)
        if rp is not None and rp.sid == info.sid and rp.node_id in (node_id, ""):
            self._drop(rp, info)

    def apply_roster(self, node_id: str, address: str, versions: dict[str, int]) -> bool:
        """A node's list of its participants in the room. True when we lack some state (ask for a snapshot)."""
        now = time.monotonic()
        known = {}
        for rp in list(self.by_identity.values()):
            if rp.node_id == node_id:
                if rp.sid in versions:
                    rp.seen = now
                    known[rp.sid] = rp
                else:
                    self._drop(rp)  # its leave was lost
            elif not rp.node_id and rp.sid in versions:
                rp.node_id, rp.address, rp.seen = node_id, address, now  # confirmed by its node
                known[rp.sid] = rp
        missing = any(sid not in known or (known[sid].info.version < version and known[sid].node_id == node_id)
                      for sid, version in versions.items())
        return missing or any(not rp.specs and rp.info.tracks for rp in known.values())

    def apply_scores(self, node_id: str, scores: dict[str, float]) -> None:
        for rp in self.by_identity.values():
            if rp.node_id == node_id and rp.sid in scores:
                rp.score = scores[rp.sid]

    def scores(self) -> dict[str, float]:
        return {rp.sid: rp.score for rp in self.by_identity.values() if rp.score is not None}

    def apply_speakers(self, speakers: list[models.SpeakerInfo]) -> None:
        known = {rp.sid for rp in self.by_identity.values()}
        changed = []
        for info in speakers:
            if info.sid not in known:
                continue
            if info.active and info.level > 0:
                self.speaking[info.sid] = info.level
            else:
                self.speaking.pop(info.sid, None)
            changed.append(info)
        if changed:
            self.room.broadcast(rtc_pb.SignalResponse(speakers_changed=rtc_pb.SpeakersChanged(speakers=changed)))

    def local_joined(self, identity: str, sid: str) -> None:
        """A participant joined here with an identity another node hosts: this join is the newer one (or the same
        participant, moved here: then the room's own update replaces it without a disconnect)."""
        rp = self.by_identity.get(identity)
        if rp is not None:
            self._drop(rp, silent=rp.sid == sid)

    def expire(self, now: float, healthy_since: float, timeout: float, seed_timeout: float) -> list[RemoteParticipant]:
        """Drop participants of nodes silent for `timeout` (while the bus works); returns them."""
        dropped = []
        for rp in list(self.by_identity.values()):
            limit = timeout if rp.node_id else seed_timeout
            if now - max(rp.seen, healthy_since) > limit:
                log.info("%s: %s silent for %.0fs; dropping it", self.room.name, rp, now - rp.seen)
                self._drop(rp)
                dropped.append(rp)
        return dropped

    def drop_node(self, node_id: str) -> list[RemoteParticipant]:
        gone = [rp for rp in self.by_identity.values() if rp.node_id == node_id]
        for rp in gone:
            self._drop(rp)
        return gone

    # --- tracks -----------------------------------------------------------------------------------------------

    def _sync_tracks(self, rp: RemoteParticipant) -> None:
        current = {t.sid: t for t in rp.info.tracks}
        for sid in [s for s in rp.tracks if s not in current]:
            self._close_track(rp.tracks.pop(sid))
        if rp.hidden or not rp.address:
            return
        for sid, info in current.items():
            relayed = rp.tracks.get(sid)
            if relayed is not None:
                relayed.update_info(info)
                continue
            spec = rp.specs.get(sid)
            if spec is None:
                continue
            origin = self.link.cluster.origin(rp.node_id, rp.address)
            relayed = RelayedTrack(origin, self.room.name, rp.sid, spec, info,
                                   on_subscribed=lambda identity=rp.identity, sid=sid: self.link.track_subscribed(
                                       identity, sid))
            relayed.published.access = rp.access
            rp.tracks[sid] = relayed
            log.info("%s: %s", self.room.name, relayed)
            subscribed = False
            for other in list(self.room.participants.values()):
                if not other.closed and other.auto_subscribe and other.permission.can_subscribe:
                    other.subscriber.subscribe(relayed.published, rp.sid)
                    subscribed = subscribed or sid in other.subscriber.subs
            if subscribed:
                relayed.want()

    def _close_track(self, relayed: RelayedTrack) -> None:
        for other in list(self.room.participants.values()):
            other.subscriber.unsubscribe(relayed.sid)
        relayed.close()

    def tick(self, now: float) -> None:
        """Start relaying what a local participant subscribed to; stop what nobody here receives any more."""
        for rp in list(self.by_identity.values()):
            for relayed in rp.tracks.values():
                relayed.up.tick(now)  # follow layers, re-ask for the keyframe a new subscriber waits for
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: linked=%s layers=%s downs=%s", relayed, relayed.linked,
                              [(l.rid, l.ssrc, l.packets, len(l.subs)) for l in relayed.up.layers],
                              [(d.ssrc, d.packets, d.waiting_keyframe) for d in relayed.up.downs])
                wanted = any(relayed.sid in p.subscriber.subs for p in self.room.participants.values())
                if wanted:
                    relayed.idle_since = 0.0
                    relayed.want()
                elif relayed.linked:
                    if not relayed.idle_since:
                        relayed.idle_since = now
                    elif now - relayed.idle_since > UNWANTED_LINGER:
                        relayed.unwant()

    def _drop(self, rp: RemoteParticipant, info: models.ParticipantInfo | None = None, silent: bool = False) -> None:
        if self.by_identity.get(rp.identity) is rp:
            del self.by_identity[rp.identity]
        for relayed in rp.tracks.values():
            self._close_track(relayed)
        rp.tracks.clear()
        if info is None:
            info = models.ParticipantInfo()
            info.CopyFrom(rp.info)
            info.state = State.DISCONNECTED
            info.version += 1
            del info.tracks[:]
        if not rp.hidden and not silent:
            self.room.broadcast(rtc_pb.SignalResponse(update=rtc_pb.ParticipantUpdate(participants=[info])))
        if self.speaking.pop(rp.sid, None) is not None:
            self.room.broadcast(rtc_pb.SignalResponse(speakers_changed=rtc_pb.SpeakersChanged(
                speakers=[models.SpeakerInfo(sid=rp.sid, level=0.0, active=False)])))

    def close(self) -> None:
        for rp in list(self.by_identity.values()):
            for relayed in rp.tracks.values():
                relayed.close()
            rp.tracks.clear()
        self.by_identity.clear()
        self.speaking.clear()
