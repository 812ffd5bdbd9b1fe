"""Limits on what one client controls and the timeouts the node enforces, on a media node in-process.

Each refusal answers the client (RequestResponse LIMIT_EXCEEDED, a JoinError, or a `leave` and a close with its
reason) and is counted in the node's refusals (served as `braid_limit_<name>_refused_total` by /metrics).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import media_pb2
from braid.services.media.limits import TokenBucket
from braid.services.media.node import MediaNode
from braid.services.media.room import StoreWrites
from braid.shared.bus import MemoryBus
from braid.shared.config import load_config
from braid.shared.store import MemoryRegistry, MemoryStore

from .session_stream import Stream
from .test_media_node import Notifier, _collect, _start, _token

pytestmark = pytest.mark.timeout(60)
Reason = models.DisconnectReason


def _node(**rtc) -> MediaNode:
    config = load_config(dev=True, env={}, overrides={
        "rtc": {"port_range_start": 42100, "port_range_end": 42199, **rtc},
        "limits": {"max_tracks_per_participant": 4, "max_candidates_per_transport": 8, "max_signal_queue": 50,
                   "max_metadata_size": 100, "max_attributes_size": 64, "max_participants": 3,
                   "max_data_bytes_per_second": 1000, "max_data_packet_size": 500},
    })
    return MediaNode(config, MemoryStore(), MemoryBus(), MemoryRegistry(), Notifier(), "ND_limits", "127.0.0.1:1")


@pytest.fixture
async def node():
    media = _node()
    await media.start()
    yield media
    await media.stop()


def _responses(downs) -> list[rtc_pb.SignalResponse]:
    return [rtc_pb.SignalResponse.FromString(d.response) for d in downs if d.WhichOneof("message") == "response"]


async def _joined(node: MediaNode, room: str, identity: str, **grants):
    await node.store.create_room(models.Room(sid=f"RM_{room}", name=room))
    start = _start(room, identity)
    if grants:
        start.start.token = _token(identity, room, **grants)
    stream = Stream(start)
    gen = node.servicer.Session(stream, None)
    (first,) = await _collect(gen, 1)
    assert first.WhichOneof("message") == "response", first
    return stream, gen, node.rooms[room].by_identity(identity)


async def test_tracks_candidates_and_metadata_are_refused_past_their_limits(node):
    stream, gen, p = await _joined(node, "lim1", "alice", canUpdateOwnMetadata=True)
    stream.request(add_track=rtc_pb.AddTrackRequest(cid="many", layers=[models.VideoLayer()] * 9))
    for i in range(6):
        stream.request(add_track=rtc_pb.AddTrackRequest(cid=f"cid-{i}", name="mic", type=models.AUDIO))
    stream.request(add_track=rtc_pb.AddTrackRequest(cid="cid-0", name="mic", type=models.AUDIO))  # a repeat
    for i in range(10):
        stream.request(trickle=rtc_pb.TrickleRequest(
            target=rtc_pb.SignalTarget.PUBLISHER,
            candidateInit=json.dumps({"candidate": f"candidate:{i} 1 udp 1 127.0.0.1 {40000 + i} typ host"})))
    stream.request(update_metadata=rtc_pb.UpdateParticipantMetadata(metadata="m" * 101, request_id=7))
    stream.request(update_metadata=rtc_pb.UpdateParticipantMetadata(attributes={"k": "v" * 80}, request_id=8))
    stream.request(update_metadata=rtc_pb.UpdateParticipantMetadata(metadata="fine", request_id=9))
    responses = _responses(await _collect(gen, 30, timeout=3.0))

    published = [r.track_published.cid for r in responses if r.WhichOneof("message") == "track_published"]
    assert published == ["cid-0", "cid-1", "cid-2", "cid-3", "cid-0"], "4 tracks, then only the repeat"
    refused = [r.request_response for r in responses if r.WhichOneof("message") == "request_response"]
    by_kind = {}
    for rr in refused:
        by_kind.setdefault(rr.WhichOneof("request"), []).append(rr)
    assert [rr.add_track.cid for rr in by_kind["add_track"]] == ["many", "cid-4", "cid-5"]
    assert all(rr.reason == rtc_pb.RequestResponse.LIMIT_EXCEEDED and rr.message for rr in refused
               if rr.request_id != 9)
    assert len(by_kind["trickle"]) == 2, "8 candidates taken, 2 refused"
    metadata = {rr.request_id: rr.reason for rr in refused if rr.request_id}
    assert metadata == {7: rtc_pb.RequestResponse.LIMIT_EXCEEDED, 8: rtc_pb.RequestResponse.LIMIT_EXCEEDED,
                        9: rtc_pb.RequestResponse.OK}
    assert p.metadata == "fine" and p.attributes == {}
    counts = node.refusals.counts
    assert (counts["tracks"], counts["layers"], counts["candidates"], counts["metadata"],
            counts["attributes"]) == (2, 1, 2, 1, 1)
    assert node.refusals.metrics()["braid_limit_tracks_refused_total"] == 2


async def test_data_size_and_rate(node):
    _, gen, p = await _joined(node, "lim2", "dora")
    relayed = []
    p.room.relay_data = lambda sender, packet, reliable, dest: relayed.append(packet)
    p.data.on_message("_reliable", b"\x00" * 501)
    packet = models.DataPacket(user=models.UserPacket(payload=b"x" * 300)).SerializeToString()
    for _ in range(20):
        p.data.on_message("_reliable", packet)
    assert node.refusals.counts["data_packet_size"] == 1
    assert 5 <= len(relayed) <= 8, "a 2000-byte burst at 1000 bytes/s"
    assert node.refusals.counts["data_rate"] == 20 - len(relayed)


async def test_a_client_that_does_not_read_its_signal_is_dropped_with_a_reason(node):
    stream, gen, p = await _joined(node, "lim3", "erin")
    stream.request(ping=0)
    await _collect(gen, 1)  # the session reads requests now; the test stops reading what it sends back
    for i in range(200):  # nobody reads the pongs
        stream.request(ping=i)
    for _ in range(100):
        if p.closed:
            break
        await asyncio.sleep(0.02)
    assert p.closed and p.disconnect_reason == Reason.SIGNAL_CLOSE
    downs = await _collect(gen, 200, timeout=2.0)
    assert len(downs) <= 53, "the queue held at most its limit, the leave and the close"
    leave = _responses(downs)[-1]
    assert leave.WhichOneof("message") == "leave"
    assert downs[-1].WhichOneof("message") == "close" and "signal queue" in downs[-1].close.detail
    assert node.refusals.counts["signal_queue"] == 1


async def test_join_limits_node_participants_and_attribute_sizes(node):
    await node.store.create_room(models.Room(sid="RM_lim4", name="lim4"))
    big = _start("lim4", "big")
    join = rtc_pb.JoinRequest(participant_attributes={"a": "b" * 100})
    big.start.join_request = join.SerializeToString()
    (down,) = await _collect(node.servicer.Session(Stream(big), None), 1)
    assert down.error.code == "invalid_argument" and "attributes" in down.error.msg
    for name in ("p1", "p2", "p3"):
        (down,) = await _collect(node.servicer.Session(Stream(_start("lim4", name)), None), 1)
        assert down.WhichOneof("message") == "response"
    (down,) = await _collect(node.servicer.Session(Stream(_start("lim4", "p4")), None), 1)
    assert down.error.code == "node_full" and "media node is full" in down.error.msg, "retryable: placed elsewhere"
    assert node.refusals.counts["node_participants"] == 1 and node.refusals.counts["attributes"] == 1


async def test_silent_participant_is_removed_after_ping_timeout_once():
    media = _node(ping_timeout=1, connect_timeout=30)
    left = []
    media.hooks.participant_left = lambda room, p, reason: left.append((p.identity, reason))
    await media.start()
    try:
        stream, gen, p = await _joined(media, "lim5", "frank")
        stream.request(ping=1)
        await _collect(gen, 1)  # the pong
        await asyncio.sleep(0.6)
        assert not p.closed, "a ping keeps it"
        downs = await _collect(gen, 10, timeout=4.0)
        for _ in range(100):
            if left:
                break
            await asyncio.sleep(0.02)
        assert p.closed and left == [("frank", Reason.CONNECTION_TIMEOUT)]
        assert any(r.WhichOneof("message") == "leave" for r in _responses(downs))
        assert "ping timeout" in downs[-1].close.detail
        await asyncio.sleep(1.2)
        assert left == [("frank", Reason.CONNECTION_TIMEOUT)], "participant_left once"
    finally:
        await media.stop()


async def test_a_transport_that_never_connects_is_freed():
    media = _node(connect_timeout=1.5)
    await media.start()
    try:
        stream, gen, p = await _joined(media, "lim6", "gina")
        for i in range(8):  # it keeps pinging, but ICE never completes
            stream.request(ping=i)
            await _collect(gen, 1, timeout=0.4)
            await asyncio.sleep(0.4)
            if p.closed:
                break
        assert p.closed and p.disconnect_reason == Reason.CONNECTION_TIMEOUT
        assert p.pub_pc.state == "closed"
        assert "not connected" in p.disconnect_detail
    finally:
        await media.stop()


def test_token_bucket():
    bucket = TokenBucket(100, burst=200)
    assert bucket.take(150) and not bucket.take(100)
    assert TokenBucket(0).take(10 ** 9), "0: no limit"


async def test_store_writes_hold_one_entry_per_participant():
    writes = StoreWrites()
    for version in range(10_000):  # a store outage: nothing is taken while the participant keeps changing
        writes.put("put", models.ParticipantInfo(sid="PA_a", version=version))
    writes.put("put", models.ParticipantInfo(sid="PA_b"))
    writes.put("delete", models.ParticipantInfo(sid="PA_a", version=10_000))
    writes.close()
    taken = []
    while (item := await writes.get()) is not None:
        taken.append((item[0], item[1].sid, item[1].version))
    assert taken == [("put", "PA_b", 0), ("delete", "PA_a", 10_000)]


async def test_half_open_websocket_is_closed_by_heartbeat(server_factory, room_name):
    """A client that stops answering pings (a dead network path) is closed by the edge, then removed."""

    server = server_factory(env={"BRAID_RTC__WEBSOCKET_HEARTBEAT": "1"})
    token = _token("silent", room_name)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{server.ws_url}/rtc?sdk=python&protocol=16", autoping=False,
                                      headers={"Authorization": f"Bearer {token}"})
        started = asyncio.get_running_loop().time()
        kinds = []
        while True:
            msg = await asyncio.wait_for(ws.receive(), 10)
            kinds.append(msg.type)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                break
        assert aiohttp.WSMsgType.PING in kinds, "the edge pinged"
        assert asyncio.get_running_loop().time() - started < 5, "and closed the socket without a pong"
        await ws.close()


async def test_a_vanished_client_is_removed_at_ping_timeout(server_factory, room_name):
    """A client that joins, then goes silent before ICE completes (no pings, no media) is removed after
    `ping_timeout`: it hears a `leave` and its socket closes with the reason. (Its one `participant_left` goes
    through the hooks path: see test_silent_participant_is_removed_after_ping_timeout_once.)"""
    from .test_rtc_edge import RawClient

    server = server_factory(env={"BRAID_RTC__PING_TIMEOUT": "2"})
    async with RawClient(server, room_name, "vanishing") as client:
        assert client.join.ping_timeout == 2
        leave = await client.until("leave", timeout=10)
        assert leave.leave.reason == Reason.CONNECTION_TIMEOUT
        msg = await client.ws.receive(timeout=5)
        while msg.type == aiohttp.WSMsgType.BINARY:
            msg = await client.ws.receive(timeout=5)
        assert "ping timeout" in (msg.extra or ""), msg
