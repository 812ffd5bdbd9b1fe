"""Resuming a participant on a new signal connection (v0 `reconnect=1&sid=…`, v1 `JoinRequest{reconnect}`).

Order the SDKs expect (they drop anything before `reconnect` except `leave`, which fails the resume):
1. `reconnect` (ReconnectResponse): the first message, sent as soon as the participant is found;
2. the participant snapshot (`update` with everyone, the participant included), then `room_update`;
3. what was queued while the signal was down and is still meaningful (see `link.replayable`: e.g. the
   update of a participant that left meanwhile, which the snapshot cannot convey);
4. v0: a fresh subscriber offer; v1: nothing, the client sends an ICE-restart offer that is answered as any
   offer (`PeerTransport.set_remote` takes the client's new ICE credentials, keeps the socket, DTLS and SCTP).
Then the client's `sync_state` is applied (`apply_sync_state`).

A participant that is gone, closing, moving, or whose identity or PeerConnection mode does not match is told
`leave{STATE_MISMATCH, RECONNECT}`, and the SDK rejoins from scratch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from . import reliable
from .link import SignalLink, replayable
from .interfaces import MediaNode, Participant, Room

if TYPE_CHECKING:
    from braid.rpc import media_pb2
    from braid.shared.auth import Claims


log = logging.getLogger(__name__)

Reason = models.DisconnectReason


def mismatch_leave() -> rtc_pb.SignalResponse:
    return rtc_pb.SignalResponse(leave=rtc_pb.LeaveRequest(
        can_reconnect=True, reason=Reason.STATE_MISMATCH, action=rtc_pb.LeaveRequest.RECONNECT))


def locate(node: MediaNode, start: media_pb2.SessionStart, claims: Claims) -> Participant | str:
    """The live participant this resume is for, or why there is none."""
    room = node.rooms.get(start.room)
    if room is None or room.closed:
        return "room not hosted here"
    if start.participant_sid:
        p = room.participants.get(start.participant_sid)
    else:  # a client that does not send its sid: LiveKit looks the participant up by identity
        p = room.by_identity(claims.identity)
    if p is None:
        return f"no participant {start.participant_sid or claims.identity}"
    if p.identity != claims.identity:
        return f"{start.participant_sid} is not {claims.identity}"
    if p.closed or p.removing or getattr(p, "moving", False):
        return f"{p} is leaving"
    if p.single_pc != start.single_pc:
        return f"{p} joined in {'v1' if p.single_pc else 'v0'} mode"
    return p


def attach(node: MediaNode, p: Participant, connection_id: str) -> tuple[SignalLink, list[bytes]]:
    """Move the participant onto a new link; the old one's stream ends. Returns the link and the backlog."""
    link = SignalLink(connection_id or p.sid)
    backlog = p.attach(link)
    # Telemetry: the resume creates a worker if needed without a reference; the new connection takes its own.
    # The old connection's guard is released when its stream ends, before or after this.
    node.hooks.participant_resumed(p.room, p)
    node.hooks.signal_attached(p.room, p, link.guard)
    log.info("%s resumed on %s (%d queued responses)", p, link, len(backlog))
    return link, backlog


def reconnect_response(room: Room, p: Participant) -> rtc_pb.SignalResponse:
    joined = room.join_response(p)
    return rtc_pb.SignalResponse(reconnect=rtc_pb.ReconnectResponse(
        ice_servers=joined.ice_servers,
        client_configuration=joined.client_configuration,
        server_info=joined.server_info,
        last_message_seq=p.data.received.last,
    ))


def after_reconnect(room: Room, p: Participant, backlog: list[bytes]) -> None:
    """Queue what follows the ReconnectResponse on the new link."""
    everyone = [p.info()] + [o.info() for o in room.participants.values() if o is not p and not o.hidden]
    p.send(rtc_pb.SignalResponse(update=rtc_pb.ParticipantUpdate(participants=everyone)))
    p.send(rtc_pb.SignalResponse(room_update=rtc_pb.RoomUpdate(room=room.info())))
    speaking = room.speakers.current()
    if speaking:
        p.send(rtc_pb.SignalResponse(speakers_changed=rtc_pb.SpeakersChanged(speakers=speaking)))
    for data in replayable(backlog, set(room.participants)):
        p.outbox.put_nowait(data)
    p.resuming = True
    if not p.single_pc and p.sub_pc is not None:
        p.spawn(_reoffer(p), "resume-offer")


async def _reoffer(p: Participant) -> None:
    async with p._negotiating:
        await p.subscriber.reoffer()


async def apply_sync_state(p: Participant, state: rtc_pb.SyncState) -> None:
    """What the client says it has after a resume: subscriptions, published tracks, data received."""
    room = p.room
    if state.HasField("subscription"):
        sub = state.subscription
        sids = list(sub.track_sids) + [sid for pt in sub.participant_tracks for sid in pt.track_sids]
        # With auto-subscribe the SDKs list what they do not want (subscribe=false), otherwise what they want.
        if sids:
            room.update_subscriptions(p, sids, sub.subscribe)
    for sid in state.track_sids_disabled:
        p.subscriber.update_settings(sid, True, None)
    if p.resuming:
        p.resuming = False
        _sync_published(p, state.publish_tracks)
    missing = p.data.sent_reliable.missing(reliable.receive_states(state.datachannel_receive_states))
    resent = sum(p.data.resend_reliable(payload) for payload in missing)
    if missing:
        log.info("%s: resent %d/%d reliable packets the client had not received", p, resent, len(missing))


def _sync_published(p: Participant, listed) -> None:
    client = {t.track.sid for t in listed if t.track.sid}
    for track in list(p.publisher.tracks.values()):
        if track.sid not in client:  # the client dropped it while away: nobody will ever send it
            log.info("%s: %s no longer published by the client", p, track.sid)
            p.room.unpublish(p, track, by_client=True)
    for sid in client - set(p.publisher.tracks) - set(p.publisher.pending_sids.values()):
        log.info("%s: client lists unknown track %s", p, sid)
        p.send(rtc_pb.SignalResponse(track_unpublished=rtc_pb.TrackUnpublishedResponse(track_sid=sid)))
