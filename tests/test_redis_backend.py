"""The Redis store, registry and bus against a real, private redis-server (and the same contract in memory)."""

from __future__ import annotations

import asyncio

import pytest
from livekit.protocol import models

from braid.backends import Backends
from braid.shared.bus import MemoryBus
from braid.shared.config import RedisConfig
from braid.shared.redis_backend import redis_backends
from braid.shared.store import MemoryRegistry, MemoryStore, NodeInfo


@pytest.fixture(params=["memory", "redis"])
async def backends(request, tmp_path):
    if request.param == "memory":
        b = Backends(MemoryStore(), MemoryRegistry(), MemoryBus())
        yield b
        await b.close()
        return
    redis = request.getfixturevalue("redis_server")
    b = redis_backends(RedisConfig(address=redis.address, key_prefix="t"))
    b.redis_process = redis
    yield b
    await b.close()


async def test_rooms_and_participants(backends):
    store = backends.store
    room = models.Room(sid="RM_1", name="r", creation_time_ms=1, empty_timeout=5)
    stored, created = await store.create_room(room)
    assert created and stored.sid == "RM_1"
    again, created = await store.create_room(models.Room(sid="RM_2", name="r"))
    assert not created and again.sid == "RM_1", "create is atomic: the first room wins"

    await store.put_participant("r", models.ParticipantInfo(sid="PA_a", identity="a", is_publisher=True))
    await store.put_participant("r", models.ParticipantInfo(
        sid="PA_h", identity="h", permission=models.ParticipantPermission(hidden=True)))
    got = await store.get_room("r")
    assert (got.num_participants, got.num_publishers) == (1, 1), "hidden participants are not counted"
    assert {p.identity for p in await store.list_participants("r")} == {"a", "h"}

    assert not await store.delete_participant("r", "a", sid="PA_other"), "a rejoined participant is kept"
    assert await store.delete_participant("r", "a", sid="PA_a")
    assert await store.get_participant("r", "a") is None

    got.metadata = "m"
    assert await store.update_room(got)
    assert (await store.get_room("r")).metadata == "m"
    assert not await store.update_room(models.Room(name="ghost")), "update never recreates"

    await store.claim_room_node("r", "ND_1")
    assert await store.room_nodes("r") == {"ND_1": "ND_1"}
    await store.release_room_node("r", "ND_1")
    assert await store.room_nodes("r") == {}

    assert [r.name for r in await store.list_rooms()] == ["r"]
    assert await store.delete_room("r")
    assert await store.get_room("r") is None and not await store.delete_room("r")
    assert await store.list_participants("r") == []


async def test_moved_participants_are_taken_once(backends):
    store = backends.store
    assert await store.take_moved("r", "alice") is None
    await store.mark_moved("r", "alice", "PA_old", ttl=5)
    assert await store.take_moved("r", "alice") == "PA_old"
    assert await store.take_moved("r", "alice") is None, "a move is consumed by the one rejoin"
    await store.mark_moved("r", "bob", "PA_b", ttl=0.1)
    await asyncio.sleep(0.2)
    assert await store.take_moved("r", "bob") is None, "an unclaimed move expires"


async def test_registry_expires_silent_nodes(backends):
    registry = backends.registry
    await registry.heartbeat(NodeInfo(node_id="ND_a", role="media", address="x:1", region="eu"), ttl=0.3)
    await registry.heartbeat(NodeInfo(node_id="ND_s", role="signal", address="y:1"), ttl=5)
    assert [n.node_id for n in await registry.nodes("media")] == ["ND_a"]
    assert (await registry.get("ND_a")).region == "eu"
    await asyncio.sleep(0.5)
    assert await registry.nodes("media") == [], "a node whose heartbeats stopped is gone"
    assert [n.node_id for n in await registry.nodes()] == ["ND_s"]


async def test_bus_delivers_in_order(backends):
    sub = await backends.bus.subscribe("room:r")
    await asyncio.sleep(0.05)
    for i in range(5):
        await backends.bus.publish("room:r", str(i).encode())
    await backends.bus.publish("room:other", b"x")
    received = []

    async def read():
        async for message in sub:
            received.append(message)
            if len(received) == 5:
                return

    await asyncio.wait_for(read(), 5)
    assert received == [b"0", b"1", b"2", b"3", b"4"]
    await sub.close()


async def test_redis_bus_and_store_recover_after_restart(redis_server):
    b = redis_backends(RedisConfig(address=redis_server.address, key_prefix="t"))
    try:
        sub = await b.bus.subscribe("c")
        redis_server.stop()
        with pytest.raises(Exception):
            await b.store.get_room("r")
        assert not await b.healthy()
        redis_server.start()
        for _ in range(50):
            if await b.healthy():
                break
            await asyncio.sleep(0.1)
        assert await b.healthy()
        received = []

        async def read():
            async for message in sub:
                received.append(message)
                return

        reader = asyncio.create_task(read())
        for _ in range(50):
            await b.bus.publish("c", b"after-restart")
            await asyncio.sleep(0.1)
            if received:
                break
        await asyncio.wait_for(reader, 5)
        assert received == [b"after-restart"], "the subscription resubscribed by itself"
        await sub.close()
    finally:
        await b.close()
