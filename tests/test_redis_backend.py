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

    assert not await store.delete_participant("r", "a", sid="PA_other"), "only the session's own record goes"
    assert not await store.delete_participant("r", "a", sid="PA_"), "sids match exactly, not as substrings"
    assert await store.delete_participant("r", "a", sid="PA_a")
    assert await store.get_participant("r", "a") is None

    got.metadata = "m"
    assert await store.update_room(got)
    assert (await store.get_room("r")).metadata == "m"
    assert not await store.update_room(models.Room(name="ghost")), "update never recreates"

    assert await store.claim_room_node("r", "ND_1", "CL_1")
    assert await store.room_nodes("r") == {"ND_1": "CL_1"}
    assert await store.release_room_node("r", "ND_1", "CL_1")
    assert await store.room_nodes("r") == {}

    assert [r.name for r in await store.list_rooms()] == ["r"]
    assert await store.delete_room("r")
    assert await store.get_room("r") is None and not await store.delete_room("r")
    assert await store.list_participants("r") == []


async def test_a_rejoin_never_overwrites_the_session_it_replaces(backends):
    store = backends.store
    await store.create_room(models.Room(sid="RM_1", name="r"))
    old = models.ParticipantInfo(sid="PA_old", identity="a", joined_at_ms=1000, metadata="old")
    new = models.ParticipantInfo(sid="PA_new", identity="a", joined_at_ms=2000, metadata="new")
    await store.put_participant("r", old)
    await store.put_participant("r", new)
    old.metadata = "old, updated late"
    await store.put_participant("r", old)  # the old session's last write lands after the rejoin's
    assert [(p.sid, p.metadata) for p in await store.list_participants("r")] == [("PA_new", "new")], \
        "one participant per identity: its newest session"
    assert (await store.get_participant("r", "a")).sid == "PA_new"
    assert (await store.get_room("r")).num_participants == 1
    assert [p.sid for p in await store.list_sessions("r")] == ["PA_old", "PA_new"], "the old record is findable"
    # Whoever ends the old session removes exactly its record; the new session is untouched.
    assert await store.delete_participant("r", "a", "PA_old")
    assert not await store.delete_participant("r", "a", "PA_old"), "removed once"
    assert [p.sid for p in await store.list_sessions("r")] == ["PA_new"]
    assert (await store.get_participant("r", "a")).metadata == "new"
    with pytest.raises(ValueError):
        await store.delete_participant("r", "a", "")


async def test_room_claims_are_released_only_by_their_owner(backends):
    store = backends.store
    assert await store.claim_room_node("r", "ND_1", "placed:1", if_absent=True)
    assert not await store.claim_room_node("r", "ND_1", "placed:2", if_absent=True), "the first placement wins"
    assert await store.claim_room_node("r", "ND_1", "CL_a"), "the node's own claim replaces a placement claim"
    assert not await store.release_room_node("r", "ND_1", "placed:1"), "a stale owner cannot release it"
    assert await store.claim_room_node("r", "ND_1", "CL_b")  # the node hosts the room again (a new hosting)
    assert not await store.release_room_node("r", "ND_1", "CL_a"), "the earlier hosting's late release is refused"
    assert await store.room_nodes("r") == {"ND_1": "CL_b"}
    assert await store.release_room_node("r", "ND_1", "CL_b")
    assert await store.room_nodes("r") == {}


async def test_moved_participants_are_taken_once(backends):
    store = backends.store
    assert await store.take_moved("r", "alice") is None
    await store.mark_moved("r", "alice", "PA_old", ttl=5)
    moved = await store.take_moved("r", "alice")
    assert moved.sid == "PA_old" and not moved.tracks
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
