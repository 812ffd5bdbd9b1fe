"""The router's cluster-wide jobs: one reaper at a time (a store lease), rooms left by dead media nodes, placement
away from nodes an edge could not reach."""

from __future__ import annotations

import time

from livekit.protocol import models

from braid.services.router.dead_nodes import DeadNodes
from braid.services.router.lifecycle import LEASE_TTL, RoomReaper
from braid.services.router.placement import NodeSelector
from braid.services.router.rooms import RoomDirectory
from braid.shared.config import RedisConfig, RoomConfig
from braid.shared.redis_backend import redis_backends
from braid.shared.store import MemoryRegistry, MemoryStore, NodeInfo


class Notifier:
    def __init__(self):
        self.events = []

    def notify(self, event) -> None:
        self.events.append(event)

    def names(self) -> list[str]:
        return [e.event for e in self.events]


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _media(node_id: str, region: str = "") -> NodeInfo:
    return NodeInfo(node_id=node_id, role="media", address=f"{node_id}:1", region=region)


def test_placement_avoids_nodes_the_edge_could_not_reach():
    selector = NodeSelector("least_load")
    nodes = [_media("dead", "eu"), _media("live", "eu")]
    choice = selector.choose(nodes, hosting={"dead"}, region="eu", avoid={"dead"})
    assert choice.node.node_id == "live"
    assert selector.choose(nodes[:1], avoid={"dead"}).node is None


async def test_one_reaper_at_a_time_and_room_finished_once(redis_server):
    """Two routers' reapers on one Redis: only the lease holder sweeps; the room is finished once."""
    backends = [redis_backends(RedisConfig(address=redis_server.address, key_prefix="lease")) for _ in range(2)]
    notifiers, clocks, reapers = [], [], []
    try:
        for i, b in enumerate(backends):
            notifier, clock = Notifier(), Clock()
            directory = RoomDirectory(b.store, RoomConfig(), notifier)
            notifiers.append(notifier)
            clocks.append(clock)
            reapers.append(RoomReaper(directory, clock=clock, registry=b.registry, owner=f"router-{i}"))
        store = backends[0].store
        room = models.Room(sid="RM_x", name="x", empty_timeout=300, departure_timeout=5,
                           creation_time_ms=1000 * 1000)
        await store.create_room(room)
        await store.put_participant("x", models.ParticipantInfo(sid="PA_1", identity="a"))
        await reapers[0].sweep()
        await reapers[1].sweep()
        assert reapers[0]._leader and not reapers[1]._leader
        await store.delete_participant("x", "a", "PA_1")
        for clock in clocks:
            clock.now += 6
        await reapers[1].sweep()  # not the holder: does nothing
        assert await store.get_room("x") is not None
        await reapers[0].sweep()
        assert await store.get_room("x") is None
        assert notifiers[0].names() == ["room_finished"] and notifiers[1].names() == []
    finally:
        for b in backends:
            await b.close()


async def test_a_new_lease_holder_gives_empty_rooms_their_longer_timeout(redis_server):
    b = redis_backends(RedisConfig(address=redis_server.address, key_prefix="boot"))
    try:
        notifier, clock = Notifier(), Clock()
        reaper = RoomReaper(RoomDirectory(b.store, RoomConfig(), notifier), clock=clock, owner="late-router")
        # Created long ago, empty now: its previous reaper knew whether anyone was ever in it; this one does not.
        await b.store.create_room(models.Room(sid="RM_y", name="y", empty_timeout=30, departure_timeout=5,
                                              creation_time_ms=1))
        await reaper.sweep()
        clock.now += 29
        await reaper.sweep()
        assert await b.store.get_room("y") is not None, "closed before either timeout had passed under watch"
        clock.now += 2
        await reaper.sweep()
        assert await b.store.get_room("y") is None and notifier.names() == ["room_finished"]
        assert LEASE_TTL > reaper.interval
    finally:
        await b.close()


async def test_claims_and_participants_of_a_dead_media_node_are_released():
    store, registry, notifier, clock = MemoryStore(), MemoryRegistry(), Notifier(), Clock()
    dead = DeadNodes(store, registry, notifier, grace=10, clock=clock)
    await registry.heartbeat(_media("live"), ttl=1000)
    for name in ("alone", "shared"):
        await store.create_room(models.Room(sid=f"RM_{name}", name=name))
        await store.claim_room_node(name, "gone", "CL_gone")
        await store.put_participant(name, models.ParticipantInfo(sid=f"PA_{name}", identity=f"p-{name}",
                                                                 state=models.ParticipantInfo.ACTIVE))
    await store.claim_room_node("shared", "live", "CL_live")
    rooms = await store.list_rooms()
    await dead.sweep(rooms)
    clock.now += 5
    await dead.sweep(rooms)
    assert set(await store.room_nodes("alone")) == {"gone"}, "missing for less than the grace period"
    clock.now += 6
    await dead.sweep(rooms)
    assert await store.room_nodes("alone") == {} and set(await store.room_nodes("shared")) == {"live"}
    assert await store.list_participants("alone") == []
    # The live node of "shared" removes the dead node's participants itself (it knows which are whose).
    assert [p.identity for p in await store.list_participants("shared")] == ["p-shared"]
    assert [(e.event, e.participant.identity) for e in notifier.events] == [("participant_left", "p-alone")]


async def test_a_node_back_within_the_grace_period_keeps_its_claims():
    placed_on = "blip"
    store, registry, notifier, clock = MemoryStore(), MemoryRegistry(), Notifier(), Clock()
    dead = DeadNodes(store, registry, notifier, grace=10, clock=clock)
    await store.create_room(models.Room(sid="RM_r", name="r"))
    await store.claim_room_node("r", placed_on, "CL_blip")
    await dead.sweep(await store.list_rooms())
    clock.now += 8
    await registry.heartbeat(_media(placed_on), ttl=1000)  # e.g. Redis restarted and the node re-registered
    await dead.sweep(await store.list_rooms())
    clock.now += 8
    await dead.sweep(await store.list_rooms())
    assert set(await store.room_nodes("r")) == {placed_on}


async def test_room_claims_are_compare_and_delete_across_routers(redis_server):
    """Two routers and a media node on one Redis: a release by an owner whose claim was replaced removes nothing,
    and a router ages out only the placement claims no join followed, never a node's own claim."""
    from braid.shared.store import placement_claim_token

    config = RedisConfig(address=redis_server.address, key_prefix="claims")
    routers = [redis_backends(config) for _ in range(2)]
    node = redis_backends(config)
    try:
        store_a, store_b = routers[0].store, routers[1].store
        await store_a.create_room(models.Room(sid="RM_c", name="c"))
        await routers[0].registry.heartbeat(_media("ND_back"), ttl=1000)
        await routers[0].registry.heartbeat(_media("ND_idle"), ttl=1000)
        # Router A saw ND_back gone and read its claim; meanwhile ND_back came back and hosts the room anew.
        await node.store.claim_room_node("c", "ND_back", "CL_before")
        seen = await store_a.room_nodes("c")
        await node.store.claim_room_node("c", "ND_back", "CL_after")
        assert not await store_a.release_room_node("c", "ND_back", seen["ND_back"])
        # Router B placed a participant on ND_idle long ago and no join followed; another claim is fresh.
        await store_b.claim_room_node("c", "ND_idle", placement_claim_token(time.time() - 60), if_absent=True)
        await routers[0].registry.heartbeat(_media("ND_new"), ttl=1000)
        fresh = placement_claim_token(time.time())
        await store_a.claim_room_node("c", "ND_new", fresh, if_absent=True)
        dead = DeadNodes(store_b, routers[1].registry, Notifier())
        await dead.sweep(await store_b.list_rooms())
        assert await store_a.room_nodes("c") == {"ND_back": "CL_after", "ND_new": fresh}
    finally:
        for b in [*routers, node]:
            await b.close()
