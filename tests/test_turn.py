"""TURN through coturn (issue 11): Braid hands each participant time-limited TURN REST credentials, coturn (from
Debian, started here on 127.0.0.1 with `use-auth-secret`) verifies them, and SDKs forced to relay join through it
over UDP, TCP and TLS. Expired or forged credentials are refused by coturn itself.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import ssl
import time

import aiohttp
import pytest
from aioice import turn as aioice_turn
from livekit import rtc
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia
from braid.services.media.iceservers import ice_servers, rest_credentials
from braid.shared.config import ConfigError, load_config

from .servers import TurnProcess, start_server, start_turn

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def turn(tmp_path_factory) -> TurnProcess:
    server = start_turn(tmp_path_factory.mktemp("coturn"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def turn_braid(tmp_path_factory, turn):
    """A dev server per TURN transport whose JoinResponse offers only that TURN URL (so relaying must use it)."""
    started = {}

    def get(transport: str):
        if transport not in started:
            url = {"udp": turn.urls[0], "tcp": turn.urls[1], "tls": turn.urls[2], "all": ",".join(turn.urls)}[transport]
            started[transport] = start_server(tmp_path_factory.mktemp(f"braid-turn-{transport}"), env={
                "BRAID_TURN__URLS": url, "BRAID_TURN__SECRET": turn.secret, "BRAID_TURN__TTL": "600"})
        return started[transport]

    yield get
    for server in started.values():
        server.stop()


# --- credentials -------------------------------------------------------------------------------------------


def test_rest_credentials_follow_the_turn_rest_scheme():
    username, password = rest_credentials("s3cret", "alice", ttl=600, now=1_700_000_000)
    assert username == "1700000600:alice"
    assert password == base64.b64encode(hmac.new(b"s3cret", b"1700000600:alice", hashlib.sha1).digest()).decode()


def test_ice_servers_minted_static_and_passed_through():
    config = load_config(dev=True, env={}, overrides={
        "rtc": {"stun_servers": ["stun:stun.example.org:3478"]},
        "turn": {"urls": ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"],
                 "secret": "shared", "ttl": 60,
                 "servers": [{"urls": ["turn:other.example.org:3478"], "username": "u", "credential": "p"}]},
    })
    servers = ice_servers(config.rtc, config.turn, "bob", now=1000)
    assert [list(s.urls) for s in servers] == [
        ["stun:stun.example.org:3478"], ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"],
        ["turn:other.example.org:3478"]]
    assert (servers[1].username, servers[1].credential) == rest_credentials("shared", "bob", 60, now=1000)
    assert (servers[2].username, servers[2].credential) == ("u", "p")

    static = load_config(dev=True, env={"BRAID_TURN__URLS": "turn:t.example.org:3478", "BRAID_TURN__USERNAME": "x",
                                        "BRAID_TURN__CREDENTIAL": "y"})
    [server] = ice_servers(static.rtc, static.turn, "bob")
    assert (list(server.urls), server.username, server.credential) == (["turn:t.example.org:3478"], "x", "y")


@pytest.mark.parametrize("turn_config, field", [
    ({"secret": "s"}, "turn.secret"),
    ({"urls": ["http://x"]}, "turn.urls"),
    ({"urls": ["turn:x"], "ttl": 0}, "turn.ttl"),
    ({"servers": [{"username": "u"}]}, "turn.servers[0]"),
    ({"servers": [{"urls": "ftp://x"}]}, "turn.servers[0].urls"),
])
def test_bad_turn_config_names_the_field(turn_config, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_config(dev=True, env={}, overrides={"turn": turn_config})


async def _allocate(turn: TurnProcess, username: str, password: str, transport: str = "udp", tls: bool = False):
    """Allocate a relay on coturn with aioice's TURN client; returns the relayed address or raises."""
    context = None
    if tls:
        context = ssl.create_default_context(cafile=str(turn.cert))
    port = turn.tls_port if tls else turn.port
    relay, _ = await asyncio.wait_for(aioice_turn.create_turn_endpoint(
        asyncio.DatagramProtocol, server_addr=("127.0.0.1", port), username=username, password=password,
        ssl=context or False, transport="tcp" if tls else transport, lifetime=60), 10)
    try:
        return relay.get_extra_info("sockname")
    finally:
        relay.close()


async def test_coturn_accepts_minted_credentials_and_refuses_expired_or_forged(turn):
    good = rest_credentials(turn.secret, "alice", ttl=300)
    for transport, tls in (("udp", False), ("tcp", False), ("tcp", True)):
        relayed = await _allocate(turn, *good, transport=transport, tls=tls)
        assert relayed[0] == "127.0.0.1" and relayed[1] > 0, (transport, tls, relayed)

    expired = rest_credentials(turn.secret, "alice", ttl=-60)
    forged = rest_credentials("not-the-secret", "alice", ttl=300)
    tampered = (good[0].replace(":alice", ":mallory"), good[1])  # another identity under alice's password
    for username, password in (expired, forged, tampered):
        with pytest.raises(Exception) as refused:
            await _allocate(turn, username, password)
        assert "401" in str(refused.value) or "Unauthorized" in str(refused.value), refused.value


async def _join_response(server, room: str, identity: str) -> rtc_pb.JoinResponse:
    """The first message of a v1 signal connection, read as an SDK would."""
    token = join_token(server.api_key, server.api_secret, room, identity)
    join = rtc_pb.JoinRequest(client_info=models.ClientInfo(sdk=models.ClientInfo.JS, protocol=16))
    wrapped = rtc_pb.WrappedJoinRequest(compression=rtc_pb.WrappedJoinRequest.GZIP,
                                        join_request=gzip.compress(join.SerializeToString()))
    param = base64.urlsafe_b64encode(wrapped.SerializeToString()).decode()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.ws_url}/rtc/v1?join_request={param}",
                                      headers={"Authorization": f"Bearer {token}"}) as ws:
            message = await asyncio.wait_for(ws.receive(), 10)
    return rtc_pb.SignalResponse.FromString(message.data).join


async def test_join_response_carries_credentials_coturn_accepts(turn, turn_braid, room_name):
    server = turn_braid("all")
    before = time.time()
    join = await _join_response(server, room_name, "carol")
    [entry] = list(join.ice_servers)
    assert list(entry.urls) == turn.urls
    expiry, _, identity = entry.username.partition(":")
    assert identity == "carol" and before + 590 <= int(expiry) <= time.time() + 610
    for transport, tls in (("udp", False), ("tcp", False), ("tcp", True)):
        await _allocate(turn, entry.username, entry.credential, transport=transport, tls=tls)


# --- the Python SDK forced to relay ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_python_sdk_joins_through_coturn_only(turn, turn_braid, room_name, transport):
    """Both participants relay-only: every packet between them and the node goes through coturn."""
    server = turn_braid(transport)
    relay_only = rtc.RtcConfiguration(ice_transport_type=rtc.IceTransportType.TRANSPORT_RELAY)
    publisher, viewer = Observer("pub"), Observer("viewer")
    media = DemoMedia(width=320, height=240, fps=15)
    try:
        await publisher.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "pub"),
                                rtc_config=relay_only)
        await viewer.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "viewer"),
                             rtc_config=relay_only)
        await media.start(publisher.room)

        def flowing() -> bool:
            got = viewer.received.get("pub")
            return got is not None and got.frames >= 10 and len(got.samples) >= 50

        assert await wait_until(flowing, 30), (viewer.received, server.log()[-3000:], turn.log()[-3000:])
    finally:
        await media.stop()
        await asyncio.gather(publisher.close(), viewer.close())
    # coturn saw allocations for both identities over this transport.
    log = turn.log()
    for identity in ("pub", "viewer"):
        assert f":{identity}" in log, log[-3000:]
