"""Placement that keeps its promises, on a real cluster (separate processes, a private redis-server): hard limits
hold under a burst of simultaneous joins, edges fail over between registered routers, and a Redis outage is
answered with 503 at once.

One cluster serves the module; the tests run in order and the last one stops Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest
from livekit import api
from livekit.protocol import rtc as rtc_pb

from braid.clients.harness import join_token

from .cluster import KEY, SECRET, start_cluster, stop_cluster, wait_for
from .servers import start_redis

pytestmark = pytest.mark.timeout(180)

NODE_LIMIT = 20
BURST = 50


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placement")
    redis = start_redis(tmp)
    c = start_cluster(tmp, redis, signal_regions=("eu-west",), media_regions=("eu-west", "eu-west", "eu-west"),
                      media_env={"BRAID_LIMITS__MAX_PARTICIPANTS": str(NODE_LIMIT)}, port_base=53000, routers=2)
    yield c
    stop_cluster(c)
    redis.stop()


class RawSignal:
    """A signal-only client: the WebSocket join LiveKit's SDKs do, without the WebRTC that follows."""

    def __init__(self, session: aiohttp.ClientSession, ws_url: str, room: str, identity: str):
        self.session = session
        self.url = f"{ws_url}/rtc?protocol=16&sdk=python&auto_subscribe=0"
        self.token = join_token(KEY, SECRET, room, identity)
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def join(self) -> rtc_pb.JoinResponse:
        self.ws = await self.session.ws_connect(self.url, headers={"Authorization": f"Bearer {self.token}"},
                                                heartbeat=None)
        message = await asyncio.wait_for(self.ws.receive(), 30)
        response = rtc_pb.SignalResponse.FromString(message.data)
        assert response.WhichOneof("message") == "join", response
        return response.join

    async def status(self) -> int:
        """The HTTP status of a join attempt (101: upgraded)."""
        try:
            await self.join()
            return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def test_a_burst_of_joins_never_overshoots_a_node_limit(cluster, room_name):
    """50 simultaneous joins, 3 media nodes of at most 20: every join lands, no node hosts more than 20."""
    edge = cluster.signals[0]
    async with aiohttp.ClientSession() as session:
        clients = [RawSignal(session, edge.server.ws_url, room_name, f"p{i}") for i in range(BURST)]
        try:
            joined = await asyncio.gather(*(c.join() for c in clients), return_exceptions=True)
            failures = [j for j in joined if isinstance(j, BaseException)]
            assert not failures, (failures[:3], cluster.logs())
            by_node = Counter(j.server_info.node_id for j in joined)
            assert sum(by_node.values()) == BURST and max(by_node.values()) <= NODE_LIMIT, by_node
            hosting = cluster.media_hosting()
            assert sum(hosting.values()) == BURST and max(hosting.values()) <= NODE_LIMIT, hosting
            assert len(by_node) == 3, "the room spans the three nodes"
            refused = sum(n.metrics().get("braid_limit_node_participants_refused_total", 0) for n in cluster.media)
            assert refused > 0, "the burst outran the heartbeats: the nodes' own limit turned joins away"
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def test_edges_fail_over_to_another_registered_router(cluster, room_name):
    """The router the edge was configured with is killed: joins go on through the other registered router."""
    edge = cluster.signals[0]
    async with aiohttp.ClientSession() as session:
        before = RawSignal(session, edge.server.ws_url, room_name, "before")
        await before.join()
        await before.close()
        cluster.router.kill()
        started = time.monotonic()
        after = RawSignal(session, edge.server.ws_url, room_name, "after")
        try:
            joined = await after.join()
        finally:
            await after.close()
        assert joined.room.name == room_name
        assert time.monotonic() - started < 5, "failed over at once, not after the dead router's TTL"
    lk = api.LiveKitAPI(edge.server.http_url, KEY, SECRET)
    try:  # RoomService goes through the routers too
        listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
        assert [r.name for r in listed.rooms] == [room_name]
    finally:
        await lk.aclose()


async def test_with_redis_down_joins_are_refused_with_503_at_once(cluster, room_name):
    edge = cluster.signals[0]
    cluster.redis.stop()
    assert await wait_for(lambda: _readyz(edge.server.http_url) == 503, 10), "the edge noticed the outage"
    async with aiohttp.ClientSession() as session:
        for identity in ("late-1", "late-2"):
            started = time.monotonic()
            status = await RawSignal(session, edge.server.ws_url, room_name, identity).status()
            assert status == 503 and time.monotonic() - started < 1.0, (status, time.monotonic() - started)


def _readyz(base: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.status
    except OSError:
        return 0
