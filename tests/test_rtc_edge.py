"""The `/rtc*` endpoints: HTTP answers before the upgrade, and bad input after it.

Bad clients here speak raw WebSocket; a pair of official SDK clients in the same room must keep their media.
"""

from __future__ import annotations

import asyncio
import base64
import gzip


import aiohttp
import pytest
from livekit import api
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia, dominant_frequency

pytestmark = pytest.mark.timeout(120)


def _token(server, room: str, identity: str = "u", **grants) -> str:
    return join_token(server.api_key, server.api_secret, room, identity, **grants)


def _join_request(offer: str = "", **fields) -> str:
    join = rtc_pb.JoinRequest(client_info=models.ClientInfo(sdk=models.ClientInfo.PYTHON, protocol=16), **fields)
    if offer:
        join.publisher_offer.CopyFrom(rtc_pb.SessionDescription(type="offer", sdp=offer))
    wrapped = rtc_pb.WrappedJoinRequest(compression=rtc_pb.WrappedJoinRequest.GZIP,
                                        join_request=gzip.compress(join.SerializeToString()))
    return base64.urlsafe_b64encode(wrapped.SerializeToString()).decode()


async def _get(url: str, headers=None) -> tuple[int, str, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers or {}) as resp:
            return resp.status, await resp.text(), dict(resp.headers)


async def _ws_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def test_http_answers_before_upgrade(dev_server, room_name):
    base = dev_server.http_url
    good = _token(dev_server, room_name)
    auth = {"Authorization": f"Bearer {good}"}
    for path in ("/rtc", "/rtc/v1"):
        assert (await _get(base + path, auth))[0] == 404, "no WebSocket upgrade → 404"
    status, body, headers = await _get(base + "/rtc/validate", auth)
    assert (status, body, headers.get("Access-Control-Allow-Origin")) == (200, "success", "*")
    status, body, _ = await _get(f"{base}/rtc/v1/validate?join_request={_join_request()}", auth)
    assert (status, body) == (200, "success")
    status, _, headers = await _get(base + "/rtc/validate?access_token=" + good)
    assert status == 200, "the access_token parameter is accepted too (JS)"
    assert (await _get(base + "/rtc/validate"))[0] == 401
    assert (await _get(base + "/rtc/v1/validate", auth))[0] == 400, "v1 needs join_request"
    assert (await _get(base + "/rtc/v1/validate?join_request=%%%", auth))[0] == 400

    ws = dev_server.ws_url
    assert await _ws_status(f"{ws}/rtc", None) == 401
    assert await _ws_status(f"{ws}/rtc", "not-a-jwt") == 401
    bad_key = join_token("other", "secret-secret", room_name, "u")
    assert await _ws_status(f"{ws}/rtc", bad_key) == 401
    no_join = api.AccessToken(dev_server.api_key, dev_server.api_secret).with_identity("u").with_grants(
        api.VideoGrants(room_list=True)).to_jwt()
    assert await _ws_status(f"{ws}/rtc", no_join) == 401
    assert await _ws_status(f"{ws}/rtc/v1?join_request=AAAA", good) == 400
    not_gzip = base64.urlsafe_b64encode(rtc_pb.WrappedJoinRequest(
        compression=rtc_pb.WrappedJoinRequest.GZIP, join_request=b"garbage").SerializeToString()).decode()
    assert await _ws_status(f"{ws}/rtc/v1?join_request={not_gzip}", good) == 400
    bomb = base64.urlsafe_b64encode(rtc_pb.WrappedJoinRequest(
        compression=rtc_pb.WrappedJoinRequest.GZIP, join_request=gzip.compress(b"\x0a" * 3_000_000))
        .SerializeToString()).decode()
    assert await _ws_status(f"{ws}/rtc/v1?join_request={bomb}", good) == 400
    assert await _ws_status(f"{ws}/rtc/v1?join_request={_join_request()}", good) == 101


async def test_v1_switched_off_and_missing_rooms(server_factory, room_name):
    server = server_factory(env={"BRAID_RTC__ENABLE_V1": "false", "BRAID_ROOM__AUTO_CREATE": "false",
                                 "BRAID_REFRESH_TOKEN_INTERVAL": "1"})
    good = _token(server, room_name)
    auth = {"Authorization": f"Bearer {good}"}
    assert (await _get(f"{server.http_url}/rtc/v1/validate?join_request={_join_request()}", auth))[0] == 404
    assert await _ws_status(f"{server.ws_url}/rtc/v1?join_request={_join_request()}", good) == 404
    status, body, _ = await _get(f"{server.http_url}/rtc/validate", auth)
    assert (status, body) == (404, "requested room does not exist")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            async with session.ws_connect(f"{server.ws_url}/rtc", headers=auth):
                pass
    assert info.value.status == 404
    lkapi = api.LiveKitAPI(server.http_url, server.api_key, server.api_secret)
    try:
        await lkapi.room.create_room(api.CreateRoomRequest(name=room_name, max_participants=1))
    finally:
        await lkapi.aclose()
    assert (await _get(f"{server.http_url}/rtc/validate", auth))[0] == 200
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.ws_url}/rtc", headers=auth) as first:
            join = rtc_pb.SignalResponse.FromString((await first.receive()).data)
            assert join.join.participant.sid.startswith("PA_")
            assert join.join.subscriber_primary, "v0 with subscribe permission: the server offers first"
            second = _token(server, room_name, "second")
            assert await _ws_status(f"{server.ws_url}/rtc", second) == 429, "room is full"
            while True:  # a fresh token is pushed periodically (here every second)
                response = rtc_pb.SignalResponse.FromString((await first.receive(timeout=5)).data)
                if response.WhichOneof("message") == "refresh_token":
                    break
            claims = api.TokenVerifier(server.api_key, server.api_secret).verify(response.refresh_token)
            assert claims.identity == "u" and claims.video.room == room_name
            await first.send_bytes(rtc_pb.SignalRequest(leave=rtc_pb.LeaveRequest(
                reason=models.DisconnectReason.CLIENT_INITIATED)).SerializeToString())
            msg = await first.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), "a leave ends the session"
        # the leave freed the only seat at once
        assert await _ws_status(f"{server.ws_url}/rtc", _token(server, room_name, "third")) == 101


class RawClient:
    """A WebSocket signal client without WebRTC: joins over v0 and sends whatever a test wants."""

    def __init__(self, server, room: str, identity: str, **grants):
        self.url = f"{server.ws_url}/rtc?sdk=python&protocol=16&auto_subscribe=0"
        self.token = _token(server, room, identity, **grants)
        self.session = aiohttp.ClientSession()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.join: rtc_pb.JoinResponse | None = None

    async def __aenter__(self) -> RawClient:
        self.ws = await self.session.ws_connect(self.url, headers={"Authorization": f"Bearer {self.token}"},
                                                max_msg_size=0)
        first = rtc_pb.SignalResponse.FromString((await self.ws.receive()).data)
        self.join = first.join
        return self

    async def __aexit__(self, *exc) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.session.close()

    async def send(self, request: rtc_pb.SignalRequest | bytes) -> None:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        await self.ws.send_bytes(data)

    async def until(self, kind: str, timeout: float = 10.0) -> rtc_pb.SignalResponse | None:
        """Read until a response of `kind` (or the socket closes: None)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(kind)
            msg = await self.ws.receive(timeout=left)
            if msg.type != aiohttp.WSMsgType.BINARY:
                return None
            response = rtc_pb.SignalResponse.FromString(msg.data)
            if response.WhichOneof("message") == kind:
                return response


async def test_bad_input_ends_only_the_offender(dev_server, room_name):
    a = Observer("a")
    b = Observer("b")
    await a.connect(dev_server.ws_url, _token(dev_server, room_name, "a"))
    await b.connect(dev_server.ws_url, _token(dev_server, room_name, "b"))
    media = DemoMedia(frequency=440, video=False)
    try:
        await media.start(a.room)
        assert await wait_until(lambda: len(b.received.get("a").samples if b.received.get("a") else []) > 100, 15)

        async with RawClient(dev_server, room_name, "pinger") as c:
            assert c.join.ping_interval == 5 and c.join.ping_timeout == 15
            assert c.join.server_info.version and c.join.room.sid.startswith("RM_")
            assert [p.identity for p in c.join.other_participants] == ["a", "b"]
            await c.send(rtc_pb.SignalRequest(ping_req=rtc_pb.Ping(timestamp=1234)))
            pong = await c.until("pong_resp")
            assert pong.pong_resp.last_ping_timestamp == 1234 and pong.pong_resp.timestamp > 0
            await c.send(rtc_pb.SignalRequest(ping=99))
            assert (await c.until("pong")).pong > 0

        async with RawClient(dev_server, room_name, "garbage") as c:
            await c.send(b"\xff\xff\xff\xff not a protobuf")
            leave = await c.until("leave")
            assert leave.leave.action == rtc_pb.LeaveRequest.DISCONNECT
            assert await c.until("never", 5) is None, "the socket is closed after the leave"

        async with RawClient(dev_server, room_name, "bad-sdp") as c:
            await c.send(rtc_pb.SignalRequest(offer=rtc_pb.SessionDescription(type="offer", sdp="v=0\r\nnonsense")))
            assert (await c.until("leave")).leave.reason == models.DisconnectReason.STATE_MISMATCH

        async with RawClient(dev_server, room_name, "viewer", can_publish=False) as c:
            await c.send(rtc_pb.SignalRequest(add_track=rtc_pb.AddTrackRequest(
                cid="cam", name="cam", type=models.TrackType.VIDEO, source=models.TrackSource.CAMERA)))
            refused = await c.until("request_response")
            assert refused.request_response.reason == rtc_pb.RequestResponse.NOT_ALLOWED
            assert refused.request_response.add_track.cid == "cam"
            await c.send(rtc_pb.SignalRequest(update_metadata=rtc_pb.UpdateParticipantMetadata(
                metadata="x", request_id=7)))
            refused = await c.until("request_response")
            assert (refused.request_response.request_id, refused.request_response.reason) == (
                7, rtc_pb.RequestResponse.NOT_ALLOWED)

        async with RawClient(dev_server, room_name, "huge") as c:
            await c.ws.send_bytes(b"\x00" * 1_000_000)
            msg = await c.ws.receive(timeout=10)
            while msg.type == aiohttp.WSMsgType.BINARY:  # the subscriber offer may come first
                msg = await c.ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert c.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

        before = len(b.received["a"].samples)
        assert await wait_until(lambda: len(b.received["a"].samples) > before + 100, 10), "media kept flowing"
        samples = b.received["a"].audio()[-48000:]
        assert abs(dominant_frequency(samples) - 440) < 8
        assert await wait_until(lambda: not any(
            p.identity in ("garbage", "bad-sdp", "huge", "pinger", "viewer") for p in a.room.remote_participants.values()
        ), 15)
    finally:
        await media.stop()
        await a.close()
        await b.close()



