"""A participant hosted by this media node: its state, its signal requests, its PeerConnection(s) and data."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from google.protobuf.message import DecodeError
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.shared import ids
from braid.shared.auth import Claims

from . import negotiation, resume, rtcp, sdp
from .data import ServerRpc, is_agent, stamp_sender
from .datachannels import LOSSY, RELIABLE, DataChannels
from .limits import fields_problem, merged_attributes
from .link import SignalLink
from .permissions import InvalidPermission
from .publisher import Publisher, PublishedTrack
from .quality import ParticipantQuality
from .subscriber import Subscriber, Subscription, quality_for
from .telemetry import ReferenceGuard
from .transport import PeerTransport
from .interfaces import Room


log = logging.getLogger(__name__)

State = models.ParticipantInfo.State
Reason = models.DisconnectReason


class ProtocolError(Exception):
    """The client sent something that ends its session (unparsable SDP, a broken frame)."""


def permission_from(claims: Claims) -> models.ParticipantPermission:
    v = claims.video
    sources = []
    for name in v.can_publish_sources:
        value = models.TrackSource.Value(str(name).upper()) if str(name).upper() in models.TrackSource.keys() else None
        if value is not None:
            sources.append(value)
    return models.ParticipantPermission(
        can_subscribe=v.can_subscribe,
        can_publish=v.can_publish,
        can_publish_data=v.can_publish_data,
        can_publish_sources=sources,
        hidden=v.hidden,
        recorder=v.recorder,
        can_update_metadata=v.can_update_own_metadata,
        agent=v.agent,
    )


def kind_from(claims: Claims) -> int:
    name = (claims.kind or "standard").upper()
    return models.ParticipantInfo.Kind.Value(name) if name in models.ParticipantInfo.Kind.keys() else 0


class Participant:
    def __init__(self, room: Room, claims: Claims, join: rtc_pb.JoinRequest, single_pc: bool,
                 moved: models.ParticipantInfo | None = None):
        self.room = room
        self.node = room.node
        self.claims = claims
        # A participant moved here from a draining node keeps its sid (and its tracks theirs, see Publisher), and
        # its arrival is a migration.
        self.sid = moved.sid if moved is not None else ids.participant_sid()
        self.migrated = moved is not None
        self.moving = False  # a draining node told it to rejoin elsewhere: whatever ends it here is a migration
        self.identity = claims.identity
        self.name = claims.name
        self.metadata = join.metadata or claims.metadata
        self.attributes = {**claims.attributes, **dict(join.participant_attributes)}
        self.kind = kind_from(claims)
        self.permission = permission_from(claims)
        self.client_info = join.client_info
        self.single_pc = single_pc
        self.auto_subscribe = join.connection_settings.auto_subscribe if join.HasField("connection_settings") else True
        self.state = State.JOINING
        self.version = 0
        self.joined_at = time.time()
        self.disconnect_reason = Reason.UNKNOWN_REASON
        self.disconnect_detail = ""  # why, in words, for the edge's WebSocket close (a limit, a timeout)
        self.limits = self.node.config.limits
        self.last_signal_at = time.monotonic()  # the last request from the client (SDKs ping every few seconds)
        self.candidates: dict[int, int] = {}  # trickled candidates per signal target
        self.link = SignalLink()  # the signal connection it is reached through; a resume swaps it
        self.closed = False
        self.removing = False
        self.last_token_refresh = time.time()
        self.signal_connected = True
        self.signal_lost_at = 0.0
        self.publisher = Publisher(self, moved.tracks if moved is not None else ())
        self.subscriber = Subscriber(self, compiled=self.node.send_path is not None)
        self.pub_pc: PeerTransport | None = None
        self.sub_pc: PeerTransport | None = None
        self.data = DataChannels(self.limits, self._on_data_packet, self.refuse, self._slow_data_receiver)
        self.server_rpc = ServerRpc()  # PerformRpc calls waiting on this participant
        self.resuming = False  # between a resume and the client's sync_state
        self.last_answer_mids: set[str] = set()
        self.answer_version = 0
        self.session_id = int(time.time() * 1000)
        self.guard = ReferenceGuard(holder=f"session:{self.sid}")
        self.quality = ParticipantQuality()
        self._negotiating = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def __repr__(self) -> str:
        return f"{self.identity}({self.sid})"

    # --- info ------------------------------------------------------------------------------------------

    @property
    def hidden(self) -> bool:
        return self.permission.hidden

    def info(self) -> models.ParticipantInfo:
        return models.ParticipantInfo(
            sid=self.sid,
            identity=self.identity,
            state=self.state,
            tracks=self.published_infos(),
            metadata=self.metadata,
            joined_at=int(self.joined_at),
            joined_at_ms=int(self.joined_at * 1000),
            name=self.name,
            version=self.version,
            permission=self.permission,
            region=self.node.config.region,
            is_publisher=bool(self.publisher.tracks),
            kind=self.kind,
            attributes=self.attributes,
            disconnect_reason=self.disconnect_reason,
            client_protocol=self.client_info.client_protocol,
        )

    def published_infos(self) -> list[models.TrackInfo]:
        return [t.info for t in self.publisher.tracks.values()]

    def changed(self) -> None:
        """Bump the version and tell the room (which broadcasts and persists)."""
        self.version += 1
        self.room.participant_changed(self)

    # --- signal connections ---------------------------------------------------------------------------

    @property
    def outbox(self) -> asyncio.Queue[bytes | None]:
        return self.link.queue

    def attach(self, link: SignalLink) -> list[bytes]:
        """A resume: `link` replaces the current one, whose stream ends. Returns what was queued on the old one."""
        old, self.link = self.link, link
        backlog = old.take_backlog()
        old.end()
        self.signal_connected = True
        return backlog

    def detach(self, link: SignalLink) -> None:
        """`link`'s stream ended. Only the current link's end means the signal is lost (a resume may follow)."""
        if link is self.link and not self.closed and self.signal_connected:
            self.signal_connected = False
            self.signal_lost_at = time.monotonic()
        link.end()

    # --- signalling out --------------------------------------------------------------------------------

    def send(self, response: rtc_pb.SignalResponse) -> None:
        if not self.closed:
            self.send_bytes(response.SerializeToString())

    def send_bytes(self, data: bytes) -> None:
        """Queue a serialized SignalResponse; a client that lets `max_signal_queue` pile up is dropped."""
        if self.closed or self.link.push(data, self.limits.max_signal_queue) or self.removing:
            return
        self.refuse("signal_queue", f"{self.limits.max_signal_queue} signal messages queued and unread")
        self.link.force(rtc_pb.SignalResponse(leave=rtc_pb.LeaveRequest(
            reason=Reason.SIGNAL_CLOSE, action=rtc_pb.LeaveRequest.DISCONNECT)).SerializeToString())
        self.disconnect_detail = "signal queue overflow: the client does not read its messages"
        self.room.schedule_remove(self, Reason.SIGNAL_CLOSE, send_leave=False)

    def refuse(self, limit: str, why: str) -> None:
        """Count (and log) a refusal by a limit; the caller answers the client."""
        if self.node.refusals.count(limit):
            log.info("%s: %s limit: %s (refusals so far: %d)", self, limit, why, self.node.refusals.counts[limit])

    def refuse_request(self, limit: str, message: str, **request) -> None:
        """Refuse a signal request by a limit with RequestResponse LIMIT_EXCEEDED, as LiveKit does."""
        self.refuse(limit, message)
        self.send_request_response(rtc_pb.RequestResponse(
            reason=rtc_pb.RequestResponse.LIMIT_EXCEEDED, message=message, **request))

    def send_request_response(self, response: rtc_pb.RequestResponse) -> None:
        self.send(rtc_pb.SignalResponse(request_response=response))

    def send_leave(self, reason: int, action: int = rtc_pb.LeaveRequest.DISCONNECT, can_reconnect: bool = False):
        self.send(rtc_pb.SignalResponse(leave=rtc_pb.LeaveRequest(can_reconnect=can_reconnect, reason=reason,
                                                                  action=action)))

    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{self.identity}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, (ProtocolError, sdp.SdpError, negotiation.NegotiationError)):
                log.info("%s: protocol error: %s", self, exc)
                self.room.schedule_remove(self, Reason.STATE_MISMATCH, send_leave=True)
            else:
                log.error("%s: task %s failed", self, task.get_name(), exc_info=exc)

    # --- transports ------------------------------------------------------------------------------------

    def _transport(self, offerer: bool, label: str) -> PeerTransport:
        return PeerTransport(
            ice=self.node.ice,
            certificate=self.node.certificate,
            offerer=offerer,
            label=f"{self.identity}/{label}",
            on_rtp=self.publisher.on_rtp if not offerer else _drop,
            on_rtcp=self.on_rtcp,
            on_state=lambda state: self._on_transport_state(label, state),
            on_datachannel=lambda channel: self.data.add(channel.label, channel),
            send_path=self.node.send_path,
        )

    async def start(self) -> None:
        """Bind the sockets; in v0 with subscribe permission, also the subscriber PC and its data channels."""
        self.pub_pc = self._transport(offerer=False, label="pub" if not self.single_pc else "pc")
        await self.pub_pc.prepare()
        if self.single_pc:
            self.sub_pc = self.pub_pc
        elif self.permission.can_subscribe:
            self.sub_pc = self._transport(offerer=True, label="sub")
            await self.sub_pc.prepare()
            for label, ordered, retransmits in ((RELIABLE, True, None), (LOSSY, False, 0)):
                channel = self.sub_pc.create_data_channel(label, ordered=ordered, max_retransmits=retransmits)
                self.data.add(label, channel, first=True)

    @property
    def subscriber_primary(self) -> bool:
        return not self.single_pc and self.permission.can_subscribe

    def _on_transport_state(self, label: str, state: str) -> None:
        if state == "connected" and self.state == State.JOINED:
            self.state = State.ACTIVE
            self.changed()
            self.node.hooks.participant_active(self.room, self)
        elif state == "failed" and not self.closed:
            log.info("%s: %s transport failed", self, label)
            self.room.schedule_remove(self, Reason.CONNECTION_TIMEOUT, send_leave=True)
        elif state == "hangup" and not self.closed:
            log.info("%s: %s transport closed by the client", self, label)
            self.room.schedule_remove(self, Reason.CLIENT_INITIATED, send_leave=False)

    def pub_pc_send_rtcp(self, packet: bytes) -> None:
        if self.pub_pc is not None:
            self.pub_pc.send_rtcp(packet)

    def on_rtcp(self, data: bytes) -> None:
        for packet in rtcp.parse(data):
            self.publisher.on_rtcp(packet)  # SR of a stream it sends us
            self.subscriber.on_rtcp(packet)  # report blocks, PLI/FIR and NACK about streams we send it

    # --- requests --------------------------------------------------------------------------------------

    async def handle(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_signal_at = time.monotonic()
        try:
            request = rtc_pb.SignalRequest.FromString(data)
        except DecodeError:
            raise ProtocolError("undecodable SignalRequest") from None
        which = request.WhichOneof("message")
        log.debug("%s: <- %s", self, which)
        handler = getattr(self, f"_on_{which}", None) if which else None
        if handler is None:
            log.debug("%s: ignoring %s", self, which)
            return
        await handler(getattr(request, which))

    async def _on_ping(self, timestamp: int) -> None:
        self.send(rtc_pb.SignalResponse(pong=int(time.time() * 1000)))

    async def _on_ping_req(self, ping: rtc_pb.Ping) -> None:
        self.send(rtc_pb.SignalResponse(pong_resp=rtc_pb.Pong(last_ping_timestamp=ping.timestamp,
                                                              timestamp=int(time.time() * 1000))))

    async def _on_leave(self, leave: rtc_pb.LeaveRequest) -> None:
        self.room.schedule_remove(self, Reason.CLIENT_INITIATED, send_leave=False)

    async def _on_offer(self, desc: rtc_pb.SessionDescription) -> None:
        await self.handle_offer(desc)

    async def _on_answer(self, desc: rtc_pb.SessionDescription) -> None:
        if self.single_pc:
            return
        async with self._negotiating:
            await self.subscriber.on_answer(desc)

    async def _on_trickle(self, trickle: rtc_pb.TrickleRequest) -> None:
        pc = self.sub_pc if trickle.target == rtc_pb.SignalTarget.SUBSCRIBER else self.pub_pc
        if pc is None:
            return
        try:
            init = json.loads(trickle.candidateInit) if trickle.candidateInit else {}
        except ValueError:
            return
        candidate = init.get("candidate", "") if isinstance(init, dict) else ""
        if candidate:
            seen = self.candidates.get(trickle.target, 0)
            if self.limits.max_candidates_per_transport and seen >= self.limits.max_candidates_per_transport:
                self.refuse_request("candidates", f"more than {self.limits.max_candidates_per_transport} candidates",
                                    trickle=trickle)
                return
            self.candidates[trickle.target] = seen + 1
        if candidate or trickle.final:
            try:
                await pc.add_candidate(candidate or None)
            except ValueError as exc:  # e.g. a candidate after end-of-candidates: ignored, as a browser does
                log.debug("%s: trickle ignored: %s", self, exc)

    async def _on_add_track(self, req: rtc_pb.AddTrackRequest) -> None:
        if not self._may_publish(req.source):
            log.info("%s: add_track refused (no publish permission)", self)
            self.send_request_response(rtc_pb.RequestResponse(
                reason=rtc_pb.RequestResponse.NOT_ALLOWED, message="no permission to publish", add_track=req))
            return
        problem = self._add_track_problem(req)
        if problem is not None:
            self.refuse_request(*problem, add_track=req)
            return
        response = self.publisher.add_track(req)
        if response is not None:
            self.send(rtc_pb.SignalResponse(track_published=response))

    def _add_track_problem(self, req: rtc_pb.AddTrackRequest) -> tuple[str, str] | None:
        limits, publisher = self.limits, self.publisher
        if req.cid in publisher.pending:
            return None  # a repeat: answered with what was promised
        held = len(publisher.pending) + len(publisher.tracks)
        if limits.max_tracks_per_participant and held >= limits.max_tracks_per_participant:
            return "tracks", f"already {held} published and pending tracks"
        layers = max(len(req.layers), *(len(c.layers) for c in req.simulcast_codecs)) if req.simulcast_codecs \
            else len(req.layers)
        if limits.max_layers_per_track and (layers > limits.max_layers_per_track
                                            or len(req.simulcast_codecs) > limits.max_layers_per_track):
            return "layers", f"more than {limits.max_layers_per_track} layers or codecs"
        if limits.max_participant_name_length and len(req.name) > limits.max_participant_name_length:
            return "name", f"track name is longer than {limits.max_participant_name_length} characters"
        return None

    def _may_publish(self, source: int) -> bool:
        if not self.permission.can_publish:
            return False
        allowed = list(self.permission.can_publish_sources)
        return not allowed or source in allowed

    async def _on_mute(self, req: rtc_pb.MuteTrackRequest) -> None:
        self.set_track_muted(req.sid, req.muted)

    def set_track_muted(self, track_sid: str, muted: bool) -> PublishedTrack | None:
        track = self.publisher.tracks.get(track_sid)
        if track is None or track.info.muted == muted:
            return track
        track.info.muted = muted
        track.up.muted = muted
        if not muted:
            for down in track.up.downs:
                down.waiting_keyframe = True
            track.up.request_keyframe(force=True)
        self.changed()
        return track

    def may_subscribe_more(self) -> bool:
        limit = self.limits.max_subscriptions
        if limit and len(self.subscriber.subs) >= limit:
            self.refuse("subscriptions", f"already {limit} subscriptions")
            return False
        return True

    async def _on_subscription(self, req: rtc_pb.UpdateSubscription) -> None:
        sids = list(req.track_sids)
        for pt in req.participant_tracks:
            sids.extend(pt.track_sids)
        self.room.update_subscriptions(self, sids, req.subscribe)

    async def _on_subscription_permission(self, req: rtc_pb.SubscriptionPermission) -> None:
        try:
            self.publisher.access.update(req, self.room.identity_of_sid)
        except InvalidPermission as exc:
            log.info("%s: subscription permission refused: %s", self, exc)
            return
        log.info("%s: subscription permission %s", self, "everyone" if self.publisher.access.allowed is None
                 else sorted(self.publisher.access.allowed))
        self.room.subscription_permission_changed(self)

    async def _on_track_setting(self, req: rtc_pb.UpdateTrackSettings) -> None:
        for sid in req.track_sids:
            sub = self.subscriber.subs.get(sid)
            if sub is None:
                continue
            quality = quality_for(req, sub.track.info.layers)
            self.subscriber.update_settings(sid, req.disabled or quality is None, quality, req.priority, req.fps)

    def fields_problem(self, name: str, metadata: str, attributes) -> tuple[str, str] | None:
        """What `update_fields` with these would exceed: (limit, message), or None."""
        return fields_problem(self.limits, name, metadata, merged_attributes(self.attributes, attributes))

    def update_fields(self, name: str, metadata: str, attributes) -> None:
        """Name and metadata when given; attributes merged, an empty value deleting its key (LiveKit's rules)."""
        if metadata:
            self.metadata = metadata
        if name:
            self.name = name
        self.attributes = merged_attributes(self.attributes, attributes)

    async def _on_update_metadata(self, req: rtc_pb.UpdateParticipantMetadata) -> None:
        if not self.permission.can_update_metadata:
            self.send_request_response(rtc_pb.RequestResponse(
                request_id=req.request_id, reason=rtc_pb.RequestResponse.NOT_ALLOWED,
                message="does not have permission to update own metadata", update_metadata=req))
            return
        problem = self.fields_problem(req.name, req.metadata, req.attributes)
        if problem is not None:
            self.refuse_request(*problem, request_id=req.request_id, update_metadata=req)
            return
        self.update_fields(req.name, req.metadata, req.attributes)
        self.changed()
        self.send_request_response(rtc_pb.RequestResponse(request_id=req.request_id,
                                                          reason=rtc_pb.RequestResponse.OK))

    async def _on_publish_data_track_request(self, req: rtc_pb.PublishDataTrackRequest) -> None:
        # Data tracks are not implemented: a clear refusal at once, as LiveKit gives when they are disabled,
        # instead of leaving the SDK to time out.
        self.send_request_response(rtc_pb.RequestResponse(
            reason=rtc_pb.RequestResponse.NOT_ALLOWED, message="data tracks are not supported by this server",
            publish_data_track=req))

    async def _on_unpublish_data_track_request(self, req: rtc_pb.UnpublishDataTrackRequest) -> None:
        self.send_request_response(rtc_pb.RequestResponse(
            reason=rtc_pb.RequestResponse.NOT_FOUND, message=f"no data track with handle {req.pub_handle}",
            unpublish_data_track=req))

    async def _on_update_audio_track(self, req: rtc_pb.UpdateLocalAudioTrack) -> None:
        track = self.publisher.tracks.get(req.track_sid)
        if track is not None:
            del track.info.audio_features[:]
            track.info.audio_features.extend(req.features)
            self.changed()

    async def _on_update_video_track(self, req: rtc_pb.UpdateLocalVideoTrack) -> None:
        track = self.publisher.tracks.get(req.track_sid)
        if track is not None:
            track.info.width, track.info.height = req.width, req.height
            self.changed()

    async def _on_sync_state(self, req: rtc_pb.SyncState) -> None:
        log.debug("%s: sync_state received", self)
        await resume.apply_sync_state(self, req)

    # --- publisher offers ------------------------------------------------------------------------------

    async def handle_offer(self, desc: rtc_pb.SessionDescription) -> None:
        session = sdp.parse(desc.sdp)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: offer id=%s\n%s", self, desc.id, desc.sdp)
        async with self._negotiating:
            pc = self.pub_pc
            assert pc is not None
            pc.set_remote(session, is_offer=True)
            self.publisher.remember_extensions(session)
            for gone in self.publisher.stopped_mids(session):
                self.room.unpublish(self, gone, by_client=True)
            if self.single_pc:
                self.subscriber.begin_answer(session.allow_mixed)
            sections = []
            for media in session.media:
                if media.rejected or media.kind not in ("audio", "video", "application"):
                    sections.append(negotiation.rejected_section(media))
                elif media.kind == "application":
                    sections.append(negotiation.application_section(media))
                elif media.sends and self._may_publish_any():
                    sections.append(self.publisher.answer(media))
                elif self.single_pc and media.receives and self.permission.can_subscribe:
                    sections.append(self.subscriber.answer_slot(media))
                else:
                    sections.append(negotiation.inactive_section(media))
            self.answer_version += 1
            text = sdp.write(sections, pc.local_transport(pc.answer_setup), self.session_id, self.answer_version,
                             allow_mixed=session.allow_mixed)
            self.last_answer_mids = {s.mid for s in sections if s.direction == "sendonly"}
            answer = rtc_pb.SessionDescription(type="answer", sdp=text, id=desc.id)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: answer\n%s", self, text)
            if self.single_pc:
                answer.mid_to_track_id.update(self.subscriber.mid_to_track_id())
            self.send(rtc_pb.SignalResponse(answer=answer))
            for track in self.publisher.take_newly_published():
                self.room.published(self, track)
            if self.single_pc:
                self.subscriber.finish_answer()

    def _may_publish_any(self) -> bool:
        return self.permission.can_publish

    # --- subscriptions ---------------------------------------------------------------------------------

    def on_subscribed(self, sub: Subscription) -> None:
        track = sub.track
        if not track.subscribed_notified:
            publisher = self.room.participants.get(sub.publisher_sid)
            if publisher is not None:
                track.subscribed_notified = True
                publisher.send(rtc_pb.SignalResponse(track_subscribed=rtc_pb.TrackSubscribed(track_sid=track.sid)))
        self.node.hooks.track_subscribed(self.room, self, track)

    # --- data ------------------------------------------------------------------------------------------

    def _on_data_packet(self, packet: models.DataPacket, reliable: bool) -> None:
        if not self.permission.can_publish_data:
            return
        if reliable and not self.data.received.accept(packet.sequence):
            return  # a copy the client resent after a resume; relayed already
        packet.kind = models.DataPacket.RELIABLE if reliable else models.DataPacket.LOSSY
        if self.server_rpc.take(packet):
            return
        if not stamp_sender(packet, self.identity, self.sid, self.hidden, is_agent(self.kind, self.permission)):
            return
        self.room.relay_data(self, packet, reliable, list(packet.destination_identities))

    async def perform_rpc(self, method: str, payload: str, response_timeout_ms: int) -> str:
        """RoomService PerformRpc: the server calls this participant's RPC method."""
        def send(packet: models.DataPacket) -> bool:
            return self.data.send(True, packet.SerializeToString())
        return await self.server_rpc.perform(send, method, payload, response_timeout_ms)

    def _slow_data_receiver(self, buffered: int) -> None:
        if self.removing or self.closed:
            return
        self.refuse("data_buffered", f"{buffered} reliable bytes unread: disconnecting a slow receiver")
        self.disconnect_detail = "data channel backlog: the client does not read its data"
        self.room.schedule_remove(self, Reason.CONNECTION_TIMEOUT, send_leave=True)

    # --- periodic --------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if log.isEnabledFor(logging.DEBUG):
            for pc in {self.pub_pc, self.sub_pc} - {None}:
                log.debug("%s %s: state=%s in=%d out=%d errors=%d", self, pc.label, pc.state, pc.packets_in,
                          pc.packets_out, pc.errors)
            for track in self.publisher.tracks.values():
                log.debug("%s %s: layers=%s downs=%s", self, track.sid,
                          [(l.rid, l.ssrc, l.packets, len(l.subs)) for l in track.up.layers],
                          [(d.ssrc, d.packets, d.waiting_keyframe) for d in track.up.downs])
        worker = self.node.hooks.stats_worker(self.room, self)
        if worker is not None:
            self.publisher.report(worker)
            self.subscriber.report(worker)
        pub_report = self.publisher.tick(now)
        if pub_report and self.pub_pc is not None:
            self.pub_pc.send_rtcp(pub_report)
        sub_report = self.subscriber.tick(now)
        if sub_report and self.sub_pc is not None:
            self.sub_pc.send_rtcp(sub_report)

    def score_connection(self, now: float, duration: float) -> float:
        """Score the last `duration` seconds of its streams both ways (see quality.py)."""
        published = [(t.up, "useinbandfec=1" in t.codec.fmtp, t.dynacast is not None and not any(t.dynacast.sent))
                     for t in self.publisher.tracks.values()]
        subscribed = [(s.down, f"{s.kind}/{s.codec.name}" if s.codec else s.track.up.mime,
                       s.codec is not None and "useinbandfec=1" in s.codec.fmtp)
                      for s in self.subscriber.subs.values() if s.down is not None and s.down.bound]
        return self.quality.update(now, duration, published, subscribed)

    def media_silent_for(self, now: float, connecting: bool = False) -> float:
        """Seconds since the client's transports last sent anything: 0 while still connecting, or (`connecting`)
        since the newest transport was made."""
        pcs = [pc for pc in (self.pub_pc, self.sub_pc) if pc is not None and pc.state == "connected"]
        if not pcs:
            if not connecting:
                return 0.0
            made = [pc.created_at for pc in (self.pub_pc, self.sub_pc) if pc is not None]
            return now - max(made) if made else now - self.last_signal_at
        return now - max(pc.last_rx for pc in pcs)

    # --- teardown --------------------------------------------------------------------------------------

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = self.data.closed = True
        self.server_rpc.close()
        self.link.force(None)
        self.subscriber.close()
        self.publisher.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        pcs = {pc for pc in (self.pub_pc, self.sub_pc) if pc is not None}
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)


def _drop(data: bytes) -> None:
    return None
