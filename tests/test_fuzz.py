"""Fuzz and abuse, bounded in time: over 100,000 hostile inputs against one node while a real SDK client in the
same room keeps its media.

Three surfaces: the signal WebSocket (random bytes; well-framed SignalRequests with absurd sizes, counts and
values; messages out of order), the Twirp API (random and absurd bodies, with a token that may call everything),
and the media UDP ports (every port the node advertises or has bound in its range: garbage STUN, DTLS, RTP and
RTCP, NACK storms, RTCP with absurd lengths and counts). The node must stay up, log no unretrieved task
exception, grow its RSS by a bounded amount, and disconnect every hostile signal client with a reason. The suite
prints its figures: inputs tried, RSS growth, hostile clients dropped.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import string
import struct
import time

import aiohttp
import pytest
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia, dominant_frequency
from braid.shared.auth import mint_token

from .servers import free_port
from .test_rtc_edge import RawClient

pytestmark = pytest.mark.timeout(240)

SIGNAL_CLIENTS = 120
MESSAGES_PER_CLIENT = 250
TWIRP_REQUESTS = 3000
UDP_PACKETS = 70_000
RSS_GROWTH_LIMIT_MB = 150
TWIRP_METHODS = ("CreateRoom", "ListRooms", "DeleteRoom", "ListParticipants", "GetParticipant",
                 "RemoveParticipant", "MutePublishedTrack", "UpdateParticipant", "UpdateSubscriptions",
                 "SendData", "UpdateRoomMetadata", "NoSuchMethod")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.printable, k=n))


def _absurd_int(rng: random.Random) -> int:
    return rng.choice([0, 1, 2 ** 31 - 1, 2 ** 32 - 1, rng.getrandbits(32)])


# --- signal ---------------------------------------------------------------------------------------------------


def _hostile_request(rng: random.Random) -> rtc_pb.SignalRequest | bytes:
    """A well-framed request with absurd content (or, now and then, random bytes)."""
    kind = rng.randrange(14)
    if kind == 0:
        return rtc_pb.SignalRequest(add_track=rtc_pb.AddTrackRequest(
            cid=_text(rng, rng.randrange(1, 40)), name=_text(rng, rng.choice([1, 300, 5000])),
            type=rng.randrange(3), source=rng.randrange(6), width=_absurd_int(rng), height=_absurd_int(rng),
            layers=[models.VideoLayer(quality=rng.randrange(5), width=_absurd_int(rng), ssrc=_absurd_int(rng))
                    for _ in range(rng.choice([0, 1, 3, 50]))],
            simulcast_codecs=[rtc_pb.SimulcastCodec(codec=_text(rng, 8), cid=_text(rng, 5))
                              for _ in range(rng.choice([0, 2, 20]))]))
    if kind == 1:
        candidate = rng.choice([
            f"candidate:{rng.getrandbits(32)} 1 udp {_absurd_int(rng)} 127.0.0.1 {rng.randrange(1, 65536)} typ host",
            f"candidate:x 1 tcp 1 ::1 {rng.randrange(65536)} typ srflx raddr 0.0.0.0 rport 0",
            _text(rng, rng.randrange(0, 3000)),
        ])
        init = rng.choice([json.dumps({"candidate": candidate, "sdpMid": "0"}), _text(rng, 50), "[]", "null"])
        return rtc_pb.SignalRequest(trickle=rtc_pb.TrickleRequest(candidateInit=init, target=rng.randrange(3),
                                                                  final=rng.random() < 0.05))
    if kind == 2:
        return rtc_pb.SignalRequest(subscription=rtc_pb.UpdateSubscription(
            track_sids=[f"TR_{rng.getrandbits(40):x}" for _ in range(rng.choice([1, 200]))], subscribe=rng.random() < 0.7,
            participant_tracks=[models.ParticipantTracks(participant_sid=_text(rng, 10), track_sids=["TR_x"] * 5)]))
    if kind == 3:
        return rtc_pb.SignalRequest(track_setting=rtc_pb.UpdateTrackSettings(
            track_sids=[f"TR_{rng.getrandbits(20):x}"] * rng.choice([1, 100]), disabled=rng.random() < 0.5,
            quality=rng.randrange(5), width=_absurd_int(rng), height=_absurd_int(rng), fps=_absurd_int(rng),
            priority=_absurd_int(rng)))
    if kind == 4:
        return rtc_pb.SignalRequest(update_metadata=rtc_pb.UpdateParticipantMetadata(
            metadata=_text(rng, rng.choice([10, 70_000])), name=_text(rng, rng.choice([5, 400])),
            attributes={_text(rng, 8): _text(rng, rng.choice([3, 3000])) for _ in range(rng.choice([1, 40]))},
            request_id=rng.getrandbits(32)))
    if kind == 5:
        return rtc_pb.SignalRequest(mute=rtc_pb.MuteTrackRequest(sid=_text(rng, 12), muted=rng.random() < 0.5))
    if kind == 6:
        return rtc_pb.SignalRequest(ping=rng.getrandbits(63))
    if kind == 7:
        return rtc_pb.SignalRequest(ping_req=rtc_pb.Ping(timestamp=rng.getrandbits(63), rtt=rng.getrandbits(63)))
    if kind == 8:
        return rtc_pb.SignalRequest(update_audio_track=rtc_pb.UpdateLocalAudioTrack(
            track_sid=_text(rng, 10), features=[rng.randrange(10)] * rng.choice([1, 100])))
    if kind == 9:
        return rtc_pb.SignalRequest(update_video_track=rtc_pb.UpdateLocalVideoTrack(
            track_sid=_text(rng, 10), width=_absurd_int(rng), height=_absurd_int(rng)))
    if kind == 10:
        return rtc_pb.SignalRequest(update_layers=rtc_pb.UpdateVideoLayers(
            track_sid=_text(rng, 10), layers=[models.VideoLayer(width=_absurd_int(rng))] * 10))
    if kind == 11:
        return rtc_pb.SignalRequest(subscription_permission=rtc_pb.SubscriptionPermission(
            all_participants=rng.random() < 0.5,
            track_permissions=[rtc_pb.TrackPermission(participant_sid=_text(rng, 10))] * rng.choice([1, 50])))
    if kind == 12:
        return rtc_pb.SignalRequest(simulate=rtc_pb.SimulateScenario(speaker_update=_absurd_int(rng) % 2 ** 31))
    # random bytes that still decode: unknown fields of a well-framed message
    return bytes([0xFA, 0x07, 3]) + bytes(rng.getrandbits(8) for _ in range(3))


def _fatal_request(rng: random.Random) -> rtc_pb.SignalRequest | bytes:
    """What ends a session: undecodable bytes, broken SDP, an answer out of order, sync_state before anything."""
    kind = rng.randrange(5)
    if kind == 0:
        return b"\xff\xff\xff\xff" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000)))
    if kind == 1:
        return rtc_pb.SignalRequest(offer=rtc_pb.SessionDescription(type="offer", sdp=_text(rng, 2000)))
    if kind == 2:
        return rtc_pb.SignalRequest(answer=rtc_pb.SessionDescription(type="answer", sdp="v=0\r\n" + _text(rng, 500)))
    if kind == 3:
        return rtc_pb.SignalRequest(offer=rtc_pb.SessionDescription(
            type="offer", sdp="v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n" + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
            "a=mid:0\r\na=sendonly\r\n" * rng.choice([1, 200])))
    return rtc_pb.SignalRequest(leave=rtc_pb.LeaveRequest(reason=_absurd_int(rng) % 20))


async def _hostile_signal_client(server, room: str, index: int, rng: random.Random, stats: dict) -> None:
    async with RawClient(server, room, f"hostile-{index}") as c:
        reasons: list[str] = []

        async def read() -> None:
            while True:
                msg = await c.ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    reasons.append(f"close:{c.ws.close_code}:{msg.extra or ''}")
                    return
                if rtc_pb.SignalResponse.FromString(msg.data).WhichOneof("message") == "leave":
                    reasons.append("leave")

        reader = asyncio.create_task(read())
        try:
            for _ in range(MESSAGES_PER_CLIENT):
                if c.ws.closed:
                    break
                await c.send(_hostile_request(rng))
                stats["inputs"] += 1
            if not c.ws.closed:
                await c.send(_fatal_request(rng))
                stats["inputs"] += 1
            await asyncio.wait_for(reader, 15)
        except ConnectionResetError:
            await asyncio.wait_for(reader, 15)
        finally:
            reader.cancel()
        assert reasons and reasons[-1].startswith("close") and (len(reasons) > 1 or reasons[-1].split(":", 2)[2]), \
            f"hostile client {index} dropped without a reason: {reasons}"
        stats["dropped"] += 1


# --- Twirp ----------------------------------------------------------------------------------------------------


def _twirp_body(rng: random.Random) -> tuple[bytes, str]:
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400))), "application/protobuf"
    if kind == 1:
        return _text(rng, rng.randrange(0, 400)).encode(), "application/json"
    body = {
        "room": rng.choice(["fuzz-twirp", _text(rng, rng.choice([1, 300])), ""]),
        "name": rng.choice(["fuzz-twirp", _text(rng, 300)]),
        "identity": _text(rng, rng.choice([0, 5, 300])),
        "metadata": _text(rng, rng.choice([0, 10, 70_000])),
        "attributes": {_text(rng, 5): _text(rng, 100) for _ in range(rng.choice([0, 50]))},
        "max_participants": rng.choice([0, -1, 2 ** 31 - 1, 2 ** 40]),
        "empty_timeout": rng.choice([-5, 2 ** 32, "x"]),
        "data": rng.choice(["eA==", "!!!", ""]),
        "track_sids": [_text(rng, 8)] * rng.choice([0, 100]),
        "kind": rng.choice([0, 1, 99]),
        "subscribe": rng.random() < 0.5,
    }
    if kind == 3:
        body = {k: v for k, v in body.items() if rng.random() < 0.5}
    return json.dumps(body).encode(), "application/json"


async def _twirp_fuzz(server, rng: random.Random, stats: dict) -> None:
    token = mint_token(server.api_key, server.api_secret, identity="fuzzer", video={
        "roomCreate": True, "roomList": True, "roomAdmin": True, "room": "fuzz-twirp"})
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(TWIRP_REQUESTS):
            body, content_type = _twirp_body(rng)
            method = rng.choice(TWIRP_METHODS)
            async with session.post(f"{server.http_url}/twirp/livekit.RoomService/{method}", data=body,
                                    headers={"Authorization": f"Bearer {token}", "Content-Type": content_type}) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
            stats["inputs"] += 1
    assert 500 not in statuses, f"an internal error answered hostile input: {statuses}"


# --- UDP ------------------------------------------------------------------------------------------------------


def _udp_packet(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:  # STUN binding request with random attributes and a random (absurd) length
        attrs = b"".join(struct.pack("!HH", rng.getrandbits(16), n) + bytes(rng.getrandbits(8) for _ in range(n))
                         for n in (rng.randrange(0, 40) for _ in range(rng.randrange(0, 6))))
        length = rng.choice([len(attrs), rng.getrandbits(16)])
        return struct.pack("!HHI", 0x0001, length, 0x2112A442) + rng.randbytes(12) + attrs
    if kind == 1:  # DTLS record: handshake type, any version, absurd lengths
        return bytes([rng.randrange(20, 64), 0xFE, rng.choice([0xFD, 0xFF])]) + rng.randbytes(8) + \
            struct.pack("!H", rng.getrandbits(16)) + rng.randbytes(rng.randrange(0, 300))
    if kind == 2:  # RTP, any payload type, extensions claimed but missing
        first = 0x80 | rng.choice([0, 0x10, 0x20, 0x0F])
        return bytes([first, rng.randrange(96, 128)]) + rng.randbytes(10) + rng.randbytes(rng.randrange(0, 1200))
    if kind == 3:  # NACK storm: generic NACK with many FCI entries
        fci = b"".join(struct.pack("!HH", rng.getrandbits(16), 0xFFFF) for _ in range(200))
        return struct.pack("!BBHII", 0x81, 205, 2 + len(fci) // 4, rng.getrandbits(32), rng.getrandbits(32)) + fci
    if kind == 4:  # RTCP with absurd counts and lengths: RR claiming 31 blocks, SR with a huge length
        return struct.pack("!BBHI", 0x80 | 31, rng.choice([200, 201, 202, 203, 204, 206]), rng.getrandbits(16),
                           rng.getrandbits(32)) + rng.randbytes(rng.randrange(0, 64))
    if kind == 5:  # REMB with an absurd bitrate and SSRC count
        return struct.pack("!BBHII", 0x8F, 206, 5, 1, 0) + b"REMB" + bytes([255, 0xFF, 0xFF, 0xFF]) + rng.randbytes(4)
    return rng.randbytes(rng.randrange(0, 1500))


def _bound_udp_ports(start: int, end: int) -> set[int]:
    """UDP ports bound on 127.0.0.1 in the node's range (the range is this test's own)."""
    ports = set()
    with open("/proc/net/udp") as fh:
        next(fh)
        for line in fh:
            local = line.split()[1]
            port = int(local.split(":")[1], 16)
            if start <= port <= end:
                ports.add(port)
    return ports


def _advertised_ports(join_offer_sdp: str) -> set[int]:
    ports = set()
    for line in join_offer_sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) > 5 and parts[2].lower() == "udp":
                ports.add(int(parts[5]))
    return ports


def _udp_fuzz(ports: list[int], rng: random.Random, count: int) -> int:
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        while sent < count:
            for _ in range(500):  # bursts, with a breath between them so the node's loop keeps serving media
                try:
                    sock.sendto(_udp_packet(rng), ("127.0.0.1", rng.choice(ports)))
                except (BlockingIOError, OSError):
                    pass
                sent += 1
            time.sleep(0.01)
    return sent


# --- the suite ------------------------------------------------------------------------------------------------


async def test_hostile_inputs_leave_the_node_and_a_real_client_standing(server_factory, tmp_path, room_name):
    rng = random.Random(1234)
    port_start = 20000 + (free_port() % 200) * 100
    port_end = port_start + 99
    config = tmp_path / "fuzz.yaml"
    config.write_text(f"rtc:\n  port_range_start: {port_start}\n  port_range_end: {port_end}\n")
    server = server_factory("--config", str(config))
    pid = server.proc.pid

    speaker, listener = Observer("speaker"), Observer("listener")
    await speaker.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "speaker"))
    await listener.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "listener"))
    media = DemoMedia(frequency=440, video=False)
    stats = {"inputs": 0, "dropped": 0}
    started = time.monotonic()
    try:
        await media.start(speaker.room)
        heard = lambda: len(listener.received["speaker"].samples) if "speaker" in listener.received else 0  # noqa
        assert await wait_until(lambda: heard() > 100, 15), "the real client hears the speaker before the fuzz"

        async with RawClient(server, room_name, "port-finder") as finder:
            offer = await finder.until("offer")
            ports = _advertised_ports(offer.offer.sdp)
        ports |= _bound_udp_ports(port_start, port_end)
        assert ports, "the node advertises a UDP port"
        rss_before = _rss_mb(pid)
        heard_before = heard()

        udp = asyncio.create_task(asyncio.to_thread(_udp_fuzz, sorted(ports), random.Random(99), UDP_PACKETS))
        for first in range(0, SIGNAL_CLIENTS, 4):
            await asyncio.gather(*(_hostile_signal_client(server, room_name, i, random.Random(i), stats)
                                   for i in range(first, min(first + 4, SIGNAL_CLIENTS))))
        await _twirp_fuzz(server, rng, stats)
        stats["inputs"] += await udp
        heard_during = heard() - heard_before

        assert server.alive(), server.log()[-3000:]
        assert await wait_until(lambda: heard() > heard_before + heard_during + 100, 15), "media flows after the fuzz"
        samples = listener.received["speaker"].audio()[-48000:]
        assert abs(dominant_frequency(samples) - 440) < 8
        assert listener.room.connection_state == 1 and speaker.room.connection_state == 1, "the real clients stay"
        rss_after = _rss_mb(pid)
        growth = rss_after - rss_before
        print(f"\nfuzz: {stats['inputs']} hostile inputs in {time.monotonic() - started:.0f}s "
              f"({SIGNAL_CLIENTS * MESSAGES_PER_CLIENT} signal, {TWIRP_REQUESTS} Twirp, {UDP_PACKETS} UDP to "
              f"{len(ports)} ports); RSS {rss_before:.0f} → {rss_after:.0f} MB (+{growth:.0f} MB); "
              f"hostile clients dropped with a reason: {stats['dropped']}/{SIGNAL_CLIENTS}; "
              f"audio samples heard during the fuzz: {heard_during}")
        assert stats["inputs"] >= 100_000
        assert stats["dropped"] == SIGNAL_CLIENTS
        assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.0f} MB"
        assert heard_during > 0, "the real client kept hearing media during the fuzz"
        log = server.log()
        assert "Task exception was never retrieved" not in log
        assert "Traceback" not in log, log[log.index("Traceback") - 500:][:4000]
    finally:
        await media.stop()
        await speaker.close()
        await listener.close()


async def test_hostile_media_from_an_authenticated_peer():
    """What a connected participant itself may send after ICE and DTLS: RTP with any SSRC, payload type and header
    extension (new SSRCs carrying a MID included), NACK storms and RTCP with absurd counts, lengths and values,
    straight into its publisher and subscriber. Nothing raises, and the tables they fill stay within limits."""
    from livekit.protocol import models as lk_models

    from braid.services.media import rtcp, rtp, sdp

    from .session_stream import Stream
    from .test_limits import _node
    from .test_media_node import _collect, _start

    node = _node()
    await node.start()
    try:
        await node.store.create_room(lk_models.Room(sid="RM_fz", name="fz"))
        (first,) = await _collect(node.servicer.Session(Stream(_start("fz", "peer")), None), 1)
        assert first.WhichOneof("message") == "response"
        p = node.rooms["fz"].by_identity("peer")
        rng = random.Random(7)
        mid_ext = b"\x90" + bytes([rng.randrange(96, 128)]) + rng.randbytes(10) + b"\xbe\xde\x00\x01\x10\x30\x00\x00"
        for i in range(20_000):
            p.on_rtcp(_udp_packet(rng) if i % 2 else _udp_packet(rng)[:rng.randrange(0, 64)])
            data = _udp_packet(rng) if i % 3 else mid_ext[:1] + mid_ext[1:2] + rng.randbytes(10) + mid_ext[12:]
            p.publisher.on_rtp(data)
            rtp.parse(data)
            rtp.extensions(data)
            rtp.is_keyframe(rng.choice(["video/VP8", "video/H264", "video/VP9"]), data[12:])
            rtcp.parse(data)
        for _ in range(2_000):
            try:
                sdp.parse("v=0\r\n" + "\r\n".join(_text(rng, rng.randrange(0, 80)) for _ in range(20)))
            except sdp.SdpError:
                pass
        assert len(p.publisher.unknown_ssrcs) <= 64 and len(p.publisher.ssrc_map) <= 4 * 2 * 32
        assert not p.closed, "hostile media alone does not end the session"
    finally:
        await node.stop()
