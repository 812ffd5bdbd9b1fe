"""The media side of a signal session: one participant's `SessionUp` stream in, `SessionDown` stream out.

First message must be `SessionStart`, whose token this node verifies itself (the edge did too, but nothing that
reaches the gRPC port is trusted on its word); the first reply is either the
`JoinResponse` or an `RpcError` the edge turns into an HTTP status before it upgrades the WebSocket. A resume
(`SessionStart.reconnect`) answers `ReconnectResponse` first, or `leave{RECONNECT}` (see `resume.py`).
Each stream serves one `SignalLink` of the participant; a resume moves the participant to a new one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from google.protobuf.message import DecodeError
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import common_pb2, media_pb2
from braid.shared.auth import AuthError, verify_join_token

from . import negotiation, resume, sdp
from .link import SignalLink
from .participant import Participant, ProtocolError
from .room import JoinError
from .interfaces import MediaNode


log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
Reason = models.DisconnectReason


def _error(code: str, msg: str) -> media_pb2.SessionDown:
    return media_pb2.SessionDown(error=common_pb2.RpcError(code=code, msg=msg))


def _close(reason: int, detail: str = "") -> media_pb2.SessionDown:
    return media_pb2.SessionDown(close=media_pb2.SessionEnd(reason=reason, detail=detail))


async def run_session(node: MediaNode, requests: AsyncIterator[media_pb2.SessionUp]) -> AsyncIterator[
        media_pb2.SessionDown]:
    stream = requests.__aiter__()
    try:
        first = await asyncio.wait_for(stream.__anext__(), START_TIMEOUT)
    except (StopAsyncIteration, asyncio.TimeoutError):
        return
    if first.WhichOneof("message") != "start":
        yield _error("invalid_argument", "a session must begin with SessionStart")
        return
    start = first.start
    try:
        claims = verify_join_token(start.token, node.keys, room=start.room, identity=start.identity)
    except AuthError as exc:
        log.warning("session refused (%s): %s", exc.code, exc)
        yield _error(exc.code, str(exc))
        return
    try:
        join = rtc_pb.JoinRequest.FromString(start.join_request)
    except DecodeError as exc:
        yield _error("invalid_argument", f"malformed session start: {exc}")
        return
    if start.reconnect:
        found = resume.locate(node, start, claims)
        if isinstance(found, str):
            log.info("resume of %s in %s refused: %s", claims.identity, start.room, found)
            yield _response(resume.mismatch_leave())
            yield _close(Reason.STATE_MISMATCH, found)
            return
        participant, room = found, found.room
        link, backlog = resume.attach(node, participant, start.connection_id)
        # First, and at once: the SDKs give the ReconnectResponse 5 s.
        yield _response(resume.reconnect_response(room, participant))
        resume.after_reconnect(room, participant, backlog)
    else:
        try:
            with node.admit(start.room, claims.identity):
                room = await node.room_for(start.room)
                participant = await room.join(claims, join, start.single_pc)
        except JoinError as exc:
            yield _error(exc.code, exc.msg)
            return
        link = participant.link
        link.connection_id = start.connection_id or participant.sid
        link.guard.holder = f"signal:{link.connection_id}"
        # This signal connection is a holder of the participant's stats worker (the session itself is another).
        node.hooks.signal_attached(room, participant, link.guard)
        yield _response(rtc_pb.SignalResponse(join=room.join_response(participant)))
        participant.spawn(room.after_join(participant, join), "after-join")
    reader = asyncio.create_task(_read(participant, link, stream), name=f"session-read-{participant.sid}")
    try:
        while True:
            item = await link.queue.get()
            if item is None:
                break
            yield media_pb2.SessionDown(response=item)
        if participant.closed and participant.link is link:
            yield _close(participant.disconnect_reason, participant.disconnect_detail)
    finally:
        reader.cancel()
        participant.detach(link)
        node.hooks.signal_detached(room, participant, link.guard)


def _response(response: rtc_pb.SignalResponse) -> media_pb2.SessionDown:
    return media_pb2.SessionDown(response=response.SerializeToString())


async def _read(participant: Participant, link: SignalLink, stream: AsyncIterator[media_pb2.SessionUp]) -> None:
    try:
        async for up in stream:
            kind = up.WhichOneof("message")
            if kind == "request":
                try:
                    await participant.handle(up.request)
                except (ProtocolError, sdp.SdpError, negotiation.NegotiationError) as exc:
                    log.info("%s: protocol error, ending the session: %s", participant, exc)
                    participant.room.schedule_remove(participant, Reason.STATE_MISMATCH, send_leave=True)
                    return
                except Exception:
                    log.exception("%s: request failed", participant)
            elif kind == "end":
                break
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the edge went away
        log.debug("%s: session stream ended: %r", participant, exc)
    participant.detach(link)  # wakes the writer; the participant waits for a resume unless it is closing
