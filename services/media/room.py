"""A room as this media node hosts it: its participants, who receives which track, broadcasts and data."""

from __future__ import annotations

import asyncio
import logging
import time

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid import LIVEKIT_VERSION
from braid.shared.auth import Claims, refreshed_token
from braid.shared.serverinfo import ENABLED_CODECS, server_info
from braid.shared.store import node_claim_token

from .iceservers import ice_servers
from .limits import fields_problem
from . import quality
from .participant import Participant
from .publisher import PublishedTrack
from .speakers import Speakers
from .interfaces import MediaNode


log = logging.getLogger(__name__)

MEDIA_TIMEOUT = 12.0  # a connected client's transport silent this long is gone
SIGNAL_GRACE = 10.0  # a participant whose signal connection dropped (no leave) may resume this long
STORE_TIMEOUT = 2.0
State = models.ParticipantInfo.State
Reason = models.DisconnectReason


class JoinError(Exception):
    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code = code
        self.msg = msg


class StoreWrites:
    """A room's pending store writes, the latest per participant: a store outage holds one entry per participant,
    never one per change, and what is written when the store is back is each participant's current state."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[str, models.ParticipantInfo]] = {}
        self._wake = asyncio.Event()
        self._closed = False

    def put(self, op: str, info: models.ParticipantInfo) -> None:
        self._pending.pop(info.sid, None)
        self._pending[info.sid] = (op, info)
        self._wake.set()

    def close(self) -> None:
        """`get` returns None once everything pending was taken."""
        self._closed = True
        self._wake.set()

    async def get(self) -> tuple[str, models.ParticipantInfo] | None:
        while not self._pending:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        return self._pending.pop(next(iter(self._pending)))


class Room:
    def __init__(self, node: MediaNode, info: models.Room):
        self.node = node
        self.name = info.name
        self.sid = info.sid
        self._info = info
        self.participants: dict[str, Participant] = {}
        self._persist = StoreWrites()
        self._persist_task = asyncio.create_task(self._persist_loop(), name=f"room-persist-{self.name}")
        self._tasks: set[asyncio.Task] = set()
        self.speakers = Speakers()
        self._scored_at = 0.0
        self.closed = False
        self.claim_token = node_claim_token()  # owns this hosting's claim in the store
        self.link = node.cluster.room_link(self)  # participants on other media nodes, room-wide events

    # --- info ------------------------------------------------------------------------------------------

    def info(self) -> models.Room:
        room = models.Room()
        room.CopyFrom(self._info)
        visible = [p for p in self.participants.values() if not p.hidden]
        remote_visible, remote_publishers = self.link.remote.count()
        room.num_participants = len(visible) + remote_visible
        room.num_publishers = sum(1 for p in visible if p.publisher.tracks) + remote_publishers
        return room

    def update_info(self, info: models.Room) -> None:
        self._info = info

    def by_identity(self, identity: str) -> Participant | None:
        for p in self.participants.values():
            if p.identity == identity:
                return p
        return None

    # --- joining ---------------------------------------------------------------------------------------

    async def join(self, claims: Claims, join: rtc_pb.JoinRequest, single_pc: bool) -> Participant:
        self._check_join(claims, join)
        existing = self.by_identity(claims.identity)
        if existing is not None:
            await self.remove(existing, Reason.DUPLICATE_IDENTITY, send_leave=True)
        limit = self._info.max_participants
        if limit and not claims.video.hidden:
            stored = await self.node.store.list_participants(self.name)
            others = {p.identity for p in stored if not p.permission.hidden} - {claims.identity}
            others |= {p.identity for p in self.participants.values() if not p.hidden}
            if len(others) >= limit:
                self.node.refusals.count("room_participants")
                raise JoinError("resource_exhausted", "room is full")
        moved = await self._moved(claims.identity)
        participant = Participant(self, claims, join, single_pc, moved=moved)
        try:
            await participant.start()
        except OSError as exc:
            await participant.close()
            raise JoinError("resource_exhausted", f"no media port available: {exc}") from None
        participant.state = State.JOINED
        self.participants[participant.sid] = participant
        await self._end_replaced_sessions(participant)
        self._persist.put("put", participant.info())
        self.link.local_joined(participant)
        self.broadcast_update(participant, include_self=False)
        self.node.hooks.participant_joined(self, participant)
        log.info("%s joined %s (%s)", participant, self.name, "v1 single PC" if single_pc else "v0 dual PC")
        return participant

    def _check_join(self, claims: Claims, join: rtc_pb.JoinRequest) -> None:
        """The sizes of what the client itself sets (join metadata, attributes); the node's own limits are checked
        on admission (`MediaNode.admit`)."""
        limits, refusals = self.node.config.limits, self.node.refusals
        attributes = {**claims.attributes, **dict(join.participant_attributes)}
        problem = fields_problem(limits, claims.name, join.metadata or claims.metadata, attributes)
        if problem is not None:
            refusals.count(problem[0])
            raise JoinError("invalid_argument", problem[1])

    async def _end_replaced_sessions(self, p: Participant) -> None:
        """A rejoin replaces the stored sessions of its identity hosted elsewhere (their node may have died with
        them): it ends them, with their webhook (stable id: the same if their own node also reports it), before
        its own record goes in. Local ones were removed above, with their own webhook."""
        try:
            stored = await asyncio.wait_for(self.node.store.list_sessions(self.name), STORE_TIMEOUT)
        except Exception as exc:
            log.warning("could not read the sessions %s replaces: %r", p, exc)
            return
        for old in stored:
            if old.identity != p.identity or old.sid == p.sid or old.sid in self.participants:
                continue
            log.info("%s replaces session %s stored for its identity", p, old.sid)
            self.node.hooks.participant_gone(self.info(), old, Reason.DUPLICATE_IDENTITY)
            try:
                await self.node.hooks.flush()
                await asyncio.wait_for(self.node.store.delete_participant(self.name, old.identity, old.sid),
                                       STORE_TIMEOUT)
            except Exception as exc:
                log.warning("could not remove replaced session %s: %r", old.sid, exc)

    async def _moved(self, identity: str) -> models.ParticipantInfo | None:
        try:
            return await self.node.store.take_moved(self.name, identity)
        except Exception as exc:  # the store is away: an ordinary join
            log.warning("could not check whether %s is being moved here: %r", identity, exc)
            return None

    def join_response(self, p: Participant) -> rtc_pb.JoinResponse:
        config = self.node.config
        others = [o.info() for o in self.participants.values() if o is not p and not o.hidden]
        others += self.link.remote.infos()
        codecs = list(self._info.enabled_codecs) or [models.Codec(mime=m) for m in ENABLED_CODECS]
        response = rtc_pb.JoinResponse(
            room=self.info(),
            participant=p.info(),
            other_participants=others,
            server_version=LIVEKIT_VERSION,
            server_info=server_info(config.region, self.node.node_id),
            subscriber_primary=p.subscriber_primary,
            ping_timeout=config.rtc.ping_timeout,
            ping_interval=config.rtc.ping_interval,
            server_region=config.region,
            enabled_publish_codecs=codecs,
        )
        response.ice_servers.extend(ice_servers(config.rtc, config.turn, p.identity))
        return response

    async def after_join(self, p: Participant, join: rtc_pb.JoinRequest) -> None:
        """After the JoinResponse: current speakers, subscribe to what is already published, then negotiate."""
        speaking = self.speakers.current() + self.link.remote.current_speakers()
        if speaking:
            p.send(rtc_pb.SignalResponse(speakers_changed=rtc_pb.SpeakersChanged(speakers=speaking)))
        if p.auto_subscribe and p.permission.can_subscribe:
            for other in list(self.participants.values()):
                if other is not p and not other.hidden:
                    for track in other.publisher.tracks.values():
                        p.subscriber.subscribe(track, other.sid)
            for publisher_sid, track in self.link.remote.published():
                p.subscriber.subscribe(track, publisher_sid)
        if not p.single_pc and p.sub_pc is not None:
            await p.subscriber.offer()
        if join.HasField("publisher_offer") and join.publisher_offer.sdp:
            await p.handle_offer(join.publisher_offer)

    # --- broadcasting ----------------------------------------------------------------------------------

    def broadcast_update(self, p: Participant, include_self: bool = True) -> None:
        info = p.info()
        message = rtc_pb.SignalResponse(update=rtc_pb.ParticipantUpdate(participants=[info])).SerializeToString()
        for other in self.participants.values():
            if other.closed or (other is p and not include_self) or (other is not p and p.hidden):
                continue
            other.send_bytes(message)

    def participant_changed(self, p: Participant) -> None:
        if p.sid not in self.participants:
            return
        self.broadcast_update(p)
        self._persist.put("put", p.info())
        self.link.local_changed(p)

    def broadcast(self, response: rtc_pb.SignalResponse) -> None:
        for p in self.participants.values():
            p.send(response)

    # --- tracks ----------------------------------------------------------------------------------------

    def published(self, p: Participant, track: PublishedTrack) -> None:
        log.info("%s published %s %s (%s)", p, track.kind, track.sid, track.up.mime)
        p.changed()
        self.node.hooks.track_published(self, p, track)
        if p.hidden:
            return
        for other in self.participants.values():
            if other is not p and other.auto_subscribe and other.permission.can_subscribe:
                other.subscriber.subscribe(track, p.sid)

    def unpublish(self, p: Participant, track: PublishedTrack, by_client: bool) -> None:
        if p.publisher.tracks.get(track.sid) is not track:
            return
        for other in self.participants.values():
            if other is not p:
                other.subscriber.unsubscribe(track.sid)
        p.publisher.remove(track)
        if not by_client:
            p.send(rtc_pb.SignalResponse(track_unpublished=rtc_pb.TrackUnpublishedResponse(track_sid=track.sid)))
        p.changed()
        self.node.hooks.track_unpublished(self, p, track)

    def find_track(self, track_sid: str) -> tuple[Participant, PublishedTrack] | None:
        for p in self.participants.values():
            track = p.publisher.tracks.get(track_sid)
            if track is not None:
                return p, track
        return self.link.remote.find_track(track_sid)  # published on another media node

    def identity_of_sid(self, sid: str) -> str | None:
        local = self.participants.get(sid)
        if local is not None:
            return local.identity
        return self.link.remote.identity_of_sid(sid)

    def subscription_permission_changed(self, p: Participant) -> None:
        """`p` changed who may subscribe to its tracks: enforce it here, and on the room's other nodes."""
        self.recheck_permission(p.sid, list(p.publisher.tracks.values()))
        p.version += 1
        self._persist.put("put", p.info())
        self.link.local_changed(p)

    def recheck_permission(self, publisher_sid: str, tracks: list[PublishedTrack]) -> None:
        for other in list(self.participants.values()):
            if other.sid != publisher_sid and not other.closed:
                other.subscriber.recheck_permission(tracks)

    def update_subscriptions(self, p: Participant, track_sids: list[str], subscribe: bool) -> None:
        for sid in track_sids:
            if not subscribe:
                p.subscriber.unsubscribe(sid)
                continue
            found = self.find_track(sid)
            if found is None or found[0] is p or not p.permission.can_subscribe:
                p.send(rtc_pb.SignalResponse(subscription_response=rtc_pb.SubscriptionResponse(
                    track_sid=sid, err=models.SubscriptionError.SE_TRACK_NOTFOUND)))
                continue
            p.subscriber.subscribe(found[1], found[0].sid)

    # --- data ------------------------------------------------------------------------------------------

    def relay_data(self, sender: Participant | None, packet: models.DataPacket, reliable: bool,
                   destinations: list[str]) -> int:
        payload = packet.SerializeToString()
        wanted = set(destinations)
        if sender is not None:
            self.link.data(payload, reliable, destinations)
        delivered = 0
        for p in self.participants.values():
            if p is sender or (wanted and p.identity not in wanted):
                continue
            delivered += p.data.send(reliable, payload, packet.participant_sid, packet.sequence)
        return delivered

    # --- leaving ---------------------------------------------------------------------------------------

    def schedule_remove(self, p: Participant, reason: int, send_leave: bool) -> None:
        if p.closed or p.removing:
            return
        p.removing = True
        task = asyncio.create_task(self.remove(p, reason, send_leave), name=f"remove-{p.sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def remove(self, p: Participant, reason: int, send_leave: bool) -> None:
        if self.participants.get(p.sid) is not p:
            return
        if p.moving:
            reason = Reason.MIGRATION
        if send_leave:
            p.send_leave(reason)
        del self.participants[p.sid]
        for track in list(p.publisher.tracks.values()):
            for other in self.participants.values():
                other.subscriber.unsubscribe(track.sid)
            if not p.moving:  # a moved participant's tracks go on from its new node
                self.node.hooks.track_unpublished(self, p, track)
        p.subscriber.close()
        p.publisher.close()
        p.state = State.DISCONNECTED
        p.disconnect_reason = reason
        p.version += 1
        info = p.info()
        if not p.hidden:
            message = rtc_pb.SignalResponse(update=rtc_pb.ParticipantUpdate(participants=[info]))
            for other in self.participants.values():
                other.send(message)
        self.link.local_left(info)
        await p.close()
        self.node.hooks.participant_left(self, p, reason)
        if not p.moving:  # a moved participant's record already belongs to its new node (see drain.py)
            self._persist.put("delete", info)
        log.info("%s left %s: %s", p, self.name, Reason.Name(reason))
        if not self.participants:
            self.node.room_empty(self)

    async def close(self, reason: int) -> None:
        """Everyone leaves (DeleteRoom, node shutdown)."""
        for p in list(self.participants.values()):
            await self.remove(p, reason, send_leave=True)
        await self.stop()

    async def stop(self) -> None:
        self.closed = True
        await self.link.stop()
        for task in list(self._tasks):
            task.cancel()
        self._persist.close()
        try:
            await asyncio.wait_for(self._persist_task, 5.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._persist_task.cancel()

    async def _persist_loop(self) -> None:
        """Store writes of this room, in order, off the signalling path."""
        store = self.node.store
        while True:
            item = await self._persist.get()
            if item is None:
                return
            op, info = item
            try:
                if op == "put":
                    if any(p.sid == info.sid for p in self.participants.values()):
                        await store.put_participant(self.name, info)
                else:
                    await self.node.hooks.flush()  # its participant_left is in the outbox before the record goes
                    await store.delete_participant(self.name, info.identity, info.sid)
            except Exception:
                log.exception("store write for %s in %s failed", info.identity, self.name)

    # --- periodic --------------------------------------------------------------------------------------

    def speaker_tick(self) -> None:
        levels = {p.sid: p.publisher.audio_level() for p in self.participants.values() if not p.hidden}
        changed = self.speakers.update(levels)
        if log.isEnabledFor(logging.DEBUG) and levels:
            log.debug("%s: levels %s changed %s", self.name, levels, [(c.sid, c.active) for c in changed])
        if changed:
            self.broadcast(rtc_pb.SignalResponse(speakers_changed=rtc_pb.SpeakersChanged(speakers=changed)))
            self.link.speakers(changed)

    def tick(self, now: float) -> None:
        wall = time.time()
        rtc = self.node.config.rtc
        for p in list(self.participants.values()):
            if p.closed:
                continue
            try:
                p.tick(now)
            except Exception:
                log.exception("%s: tick failed", p)
            if p.media_silent_for(now) > MEDIA_TIMEOUT:
                log.info("%s: media transport silent for %.0fs", p, p.media_silent_for(now))
                self.schedule_remove(p, Reason.CONNECTION_TIMEOUT, send_leave=True)
            elif p.signal_connected and now - p.last_signal_at > rtc.ping_timeout \
                    and p.media_silent_for(now, connecting=True) > rtc.ping_timeout:
                log.info("%s: no ping and no media for %.0fs", p, now - p.last_signal_at)
                p.disconnect_detail = f"ping timeout: signal and media silent for {rtc.ping_timeout}s"
                self.schedule_remove(p, Reason.CONNECTION_TIMEOUT, send_leave=True)
            elif p.state == State.JOINED and wall - p.joined_at > rtc.connect_timeout:
                log.info("%s: transports not connected after %.0fs", p, wall - p.joined_at)
                p.disconnect_detail = f"transport not connected within {rtc.connect_timeout:g}s"
                self.schedule_remove(p, Reason.CONNECTION_TIMEOUT, send_leave=True)
            elif not p.signal_connected and now - p.signal_lost_at > SIGNAL_GRACE:
                self.schedule_remove(p, Reason.SIGNAL_CLOSE, send_leave=False)
            elif p.signal_connected and wall - p.last_token_refresh >= self.node.config.refresh_token_interval:
                self.refresh_token(p, wall)
        if now - self._scored_at >= quality.UPDATE_INTERVAL:
            duration = now - self._scored_at if self._scored_at else quality.UPDATE_INTERVAL
            self._scored_at = now
            self.send_connection_quality(now, duration)

    def send_connection_quality(self, now: float, duration: float) -> None:
        """LiveKit's cadence: every participant hears its own quality and that of those whose tracks it receives."""
        local = [p for p in self.participants.values() if not p.closed]
        scores = {p.sid: p.score_connection(now, duration) for p in local}
        remote = self.link.remote.scores()
        for p in local:
            updates = [quality.info(p.sid, scores[p.sid])]
            for publisher_sid in sorted({s.publisher_sid for s in p.subscriber.subs.values()}):
                score = scores.get(publisher_sid, remote.get(publisher_sid))
                if score is not None:
                    updates.append(quality.info(publisher_sid, score))
            p.send(rtc_pb.SignalResponse(connection_quality=rtc_pb.ConnectionQualityUpdate(updates=updates)))

    def refresh_token(self, p: Participant, wall: float) -> None:
        p.last_token_refresh = wall
        secret = self.node.keys.secret(p.claims.api_key)
        if secret:
            p.send(rtc_pb.SignalResponse(refresh_token=refreshed_token(p.claims, secret)))
