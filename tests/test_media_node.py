"""The media node in-process, through its gRPC servicer contract (no signal edge): session start rules,
errors before the JoinResponse, protocol violations after it, Administer errors, registry heartbeats."""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit.protocol import models
from livekit.protocol import room as room_pb
from livekit.protocol import rtc as rtc_pb

from braid.rpc import common_pb2, media_pb2
from braid.services.media.node import MediaNode
from braid.shared.auth import mint_token
from braid.shared.bus import MemoryBus
from braid.shared.config import load_config
from braid.shared.store import MemoryRegistry, MemoryStore

from .servers import rtc_overrides
from .session_stream import Stream


class Notifier:
    def __init__(self):
        self.events = []

    def notify(self, event) -> None:
        self.events.append(event)


@pytest.fixture
async def node():
    config = load_config(dev=True, env={}, overrides={"rtc": rtc_overrides()})
    store, registry = MemoryStore(), MemoryRegistry()
    media = MediaNode(config, store, MemoryBus(), registry, Notifier(), "ND_test", "127.0.0.1:1")
    await media.start()
    yield media
    await media.stop()


def _token(identity: str, room: str, **video) -> str:
    return mint_token("devkey", "secret", identity=identity, video={"roomJoin": True, "room": room, **video})


async def _collect(gen, count: int, timeout: float = 5.0) -> list[media_pb2.SessionDown]:
    out = []

    async def run():
        async for down in gen:
            out.append(down)
            if len(out) >= count:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        pass
    return out


def _start(room: str, identity: str = "u", **kw) -> media_pb2.SessionUp:
    join = rtc_pb.JoinRequest(connection_settings=rtc_pb.ConnectionSettings(auto_subscribe=True))
    return media_pb2.SessionUp(start=media_pb2.SessionStart(
        room=room, identity=identity, token=_token(identity, room), join_request=join.SerializeToString(),
        single_pc=True, **kw))


async def test_session_must_start_with_start(node):
    stream = Stream(media_pb2.SessionUp(request=rtc_pb.SignalRequest(ping=1).SerializeToString()))
    (down,) = await _collect(node.servicer.Session(stream, None), 1)
    assert down.WhichOneof("message") == "error" and down.error.code == "invalid_argument"


async def test_errors_before_join(node):
    (down,) = await _collect(node.servicer.Session(Stream(_start("missing-room")), None), 1)
    assert (down.error.code, down.error.msg) == ("not_found", "requested room does not exist")
    bad = media_pb2.SessionUp(start=media_pb2.SessionStart(room="r", identity="u", token="not.a.token"))
    (down,) = await _collect(node.servicer.Session(Stream(bad), None), 1)
    assert down.error.code == "unauthenticated"
    await node.store.create_room(models.Room(sid="RM_r1", name="r1"))
    downs = await _collect(node.servicer.Session(Stream(_start("r1", reconnect=True, participant_sid="PA_x")), None), 2)
    leave = rtc_pb.SignalResponse.FromString(downs[0].response).leave
    assert leave.action == rtc_pb.LeaveRequest.RECONNECT, "resume is refused with a full-reconnect leave"
    assert downs[1].WhichOneof("message") == "close"


async def test_join_then_garbage_gets_leave_and_close(node):
    await node.store.create_room(models.Room(sid="RM_r2", name="r2", max_participants=1))
    stream = Stream(_start("r2", "alice"))
    gen = node.servicer.Session(stream, None)
    (first,) = await _collect(gen, 1)
    join = rtc_pb.SignalResponse.FromString(first.response).join
    assert join.participant.identity == "alice" and join.participant.sid.startswith("PA_")
    assert join.ping_interval == 5 and join.ping_timeout == 15 and join.server_info.version
    assert not join.subscriber_primary, "v1: the client offers"
    stored = await node.store.list_participants("r2")
    assert [p.identity for p in stored] == ["alice"]

    (full,) = await _collect(node.servicer.Session(Stream(_start("r2", "bob")), None), 1)
    assert full.error.code == "resource_exhausted"

    stream.push(media_pb2.SessionUp(request=b"\x08\x96\x01\xff garbage"))
    downs = await _collect(gen, 2)
    kinds = [d.WhichOneof("message") for d in downs]
    assert kinds == ["response", "close"], kinds
    assert rtc_pb.SignalResponse.FromString(downs[0].response).leave.reason == models.DisconnectReason.STATE_MISMATCH
    for _ in range(50):
        if not await node.store.list_participants("r2"):
            break
        await asyncio.sleep(0.02)
    assert await node.store.list_participants("r2") == []


async def test_signal_loss_keeps_the_participant_for_a_grace_period(node):
    await node.store.create_room(models.Room(sid="RM_r3", name="r3"))
    stream = Stream(_start("r3", "carol"))
    gen = node.servicer.Session(stream, None)
    await _collect(gen, 1)
    stream.push(media_pb2.SessionUp(end=media_pb2.SessionEnd(reason=models.DisconnectReason.SIGNAL_CLOSE)))
    await _collect(gen, 5, timeout=1.0)
    room = node.rooms["r3"]
    (p,) = room.participants.values()
    assert not p.signal_connected and not p.closed
    p.signal_lost_at = time.monotonic() - 60
    room.tick(time.monotonic())
    for _ in range(50):
        if not room.participants:
            break
        await asyncio.sleep(0.02)
    assert not room.participants


async def test_administer_errors_and_heartbeat(node):
    reply = await node.servicer.Administer(common_pb2.RoomCall(
        method="RemoveParticipant", room="nowhere",
        request=room_pb.RoomParticipantIdentity(room="nowhere", identity="x").SerializeToString()), None)
    assert reply.error.code == "not_found"
    reply = await node.servicer.Administer(common_pb2.RoomCall(method="CreateRoom", request=b""), None)
    assert reply.error.code == "unimplemented"
    reply = await node.servicer.Administer(common_pb2.RoomCall(method="SendData", request=b"\xff\xff"), None)
    assert reply.error.code == "malformed"
    (info,) = await node.registry.nodes("media")
    assert info.node_id == "ND_test" and info.address == "127.0.0.1:1" and info.state == "SERVING"



