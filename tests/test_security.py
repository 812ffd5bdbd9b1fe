"""Tokens that must not work, on every entry point of a dev server: the signal WebSocket, the Twirp API and the
media node's internal gRPC `Session` (reached directly, as anyone who can reach the port could). Each is refused
and the refusal is logged. (`/admin/drain`, served by media-role nodes only, is covered in test_drain.py.)"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
import jwt
import pytest
from livekit.protocol import rtc as rtc_pb

from braid.rpc import media_pb2, media_pb2_grpc
from braid.shared.auth import mint_token

from .servers import free_port

pytestmark = pytest.mark.timeout(90)
ROOM = "sec-room"


def _tokens(key: str, secret: str) -> dict[str, str]:
    """name → a token that must be refused for joining ROOM as `mallory`."""
    now = int(time.time())
    join = {"roomJoin": True, "room": ROOM}
    return {
        "forged": mint_token(key, "not-the-secret", identity="mallory", video=join),
        "unknown key": mint_token("nokey", secret, identity="mallory", video=join),
        "expired": mint_token(key, secret, identity="mallory", video=join, expires_at=now - 3600),
        "not yet valid": jwt.encode({"sub": "mallory", "iss": key, "nbf": now + 3600, "exp": now + 7200,
                                     "video": join}, secret, algorithm="HS256"),
        "no roomJoin": mint_token(key, secret, identity="mallory", video={"room": ROOM, "roomAdmin": True}),
        "no identity": mint_token(key, secret, video=join),
        "alg none": jwt.encode({"sub": "mallory", "iss": key, "exp": now + 60, "video": join}, None,
                               algorithm="none"),
    }


async def _ws_status(url: str, token: str) -> int:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers={"Authorization": f"Bearer {token}"}):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def _twirp(base: str, method: str, token: str, body: dict) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/twirp/livekit.RoomService/{method}", json=body,
                                headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status


async def _session(address: str, start: media_pb2.SessionStart) -> media_pb2.SessionDown:
    async with grpc.aio.insecure_channel(address) as channel:
        call = media_pb2_grpc.MediaStub(channel).Session()
        await call.write(media_pb2.SessionUp(start=start))
        down = await asyncio.wait_for(call.read(), 10)
        call.cancel()
        return down


async def test_bad_tokens_are_refused_and_logged_everywhere(server_factory):
    grpc_port = free_port()
    server = server_factory("--grpc-port", str(grpc_port))
    key, secret = server.api_key, server.api_secret
    bad = _tokens(key, secret)

    for name, token in bad.items():
        for path in ("/rtc", "/rtc/v1"):
            assert await _ws_status(server.ws_url + path, token) == 401, (name, path)

    # Twirp: bad tokens are 401; valid tokens without the grant the call needs are 403.
    for name, token in bad.items():
        if name != "no roomJoin" and name != "no identity":
            assert await _twirp(server.http_url, "ListRooms", token, {}) == 401, name
    joiner = mint_token(key, secret, identity="mallory", video={"roomJoin": True, "room": ROOM})
    other_admin = mint_token(key, secret, identity="mallory", video={"roomAdmin": True, "room": "other-room"})
    assert await _twirp(server.http_url, "ListRooms", joiner, {}) == 403, "roomJoin is not roomList"
    assert await _twirp(server.http_url, "CreateRoom", joiner, {"name": ROOM}) == 403
    assert await _twirp(server.http_url, "DeleteRoom", joiner, {"room": ROOM}) == 403
    for method, body in (("RemoveParticipant", {"room": ROOM, "identity": "alice"}),
                         ("UpdateParticipant", {"room": ROOM, "identity": "alice", "metadata": "x"}),
                         ("SendData", {"room": ROOM, "data": "eA=="})):
        assert await _twirp(server.http_url, method, other_admin, body) == 403, f"{method}: admin of another room"
        assert await _twirp(server.http_url, method, joiner, body) == 403, f"{method}: a join token"

    # Internal gRPC, reached directly: the media node verifies the token itself.
    address = f"127.0.0.1:{grpc_port}"
    join = rtc_pb.JoinRequest().SerializeToString()
    for name, token in bad.items():
        down = await _session(address, media_pb2.SessionStart(room=ROOM, identity="mallory", token=token,
                                                              join_request=join))
        assert down.WhichOneof("message") == "error" and down.error.code == "unauthenticated", name
    wrong_room = await _session(address, media_pb2.SessionStart(room="another-room", identity="mallory",
                                                                token=joiner, join_request=join))
    assert wrong_room.error.code == "unauthenticated" and "another room" in wrong_room.error.msg
    impostor = await _session(address, media_pb2.SessionStart(room=ROOM, identity="alice", token=joiner,
                                                              join_request=join))
    assert impostor.error.code == "unauthenticated" and "another identity" in impostor.error.msg
    no_token = await _session(address, media_pb2.SessionStart(room=ROOM, identity="mallory", join_request=join))
    assert no_token.error.code == "unauthenticated"

    # The edge's own limit: a frame over 512 KiB closes the socket (1009) and is counted in /metrics.
    async with aiohttp.ClientSession() as session:
        joiner_big = mint_token(key, secret, identity="big", video={"roomJoin": True, "room": ROOM})
        ws = await session.ws_connect(f"{server.ws_url}/rtc?sdk=python&protocol=16", max_msg_size=0,
                                      headers={"Authorization": f"Bearer {joiner_big}"})
        await ws.send_bytes(b"\x00" * 600_000)
        while (await asyncio.wait_for(ws.receive(), 10)).type == aiohttp.WSMsgType.BINARY:
            pass
        # 1009, or 1006 when the server's close races the rest of the client's frame: the server counts it either way
        assert ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
        for _ in range(50):
            async with session.get(f"{server.http_url}/metrics") as resp:
                metrics = await resp.text()
            if "braid_limit_signal_frame_size_refused_total" in metrics:
                break
            await asyncio.sleep(0.1)
    assert "# TYPE braid_limit_signal_frame_size_refused_total counter" in metrics
    assert "braid_limit_signal_frame_size_refused_total 1" in metrics

    await asyncio.sleep(0.3)
    log = server.log()
    assert log.count("rtc join refused (401)") >= 2 * len(bad)
    assert log.count("twirp ListRooms refused") >= len(bad) - 1
    assert log.count("session refused (unauthenticated)") >= len(bad) + 3
    assert "Task exception was never retrieved" not in log
