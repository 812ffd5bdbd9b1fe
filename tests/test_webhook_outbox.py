"""The cluster's durable webhook outbox on a real redis-server, delivering to real aiohttp receivers that verify
every event with livekit-api's WebhookReceiver: retries that outlast a long outage, per-room order, one event per
id whichever node reports it, a second node taking over, retention limits counted."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from livekit.protocol.models import ParticipantInfo, Room
from livekit.protocol.webhook import WebhookEvent

from braid.shared.outbox import RedisOutbox
from braid.shared.redis_backend import RedisStore

from .test_webhooks import KEY, SECRET, Receiver, make_receiver  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(redis_server):
    r = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    yield r
    await r.aclose()


def outbox(client, urls: list[str], owner: str, *, deliver: bool = True, **kwargs) -> RedisOutbox:
    store = RedisStore(client, "braid")

    async def never(name: str, who: str, ttl: float) -> bool:
        return False

    kwargs.setdefault("backoff_initial", 0.01)
    kwargs.setdefault("backoff_max", 0.05)
    return RedisOutbox(client, "braid", urls, KEY, SECRET, store.try_lease if deliver else never, owner,
                       timeout=1.0, **kwargs)


def event(name: str, room: str, sid: str = "") -> WebhookEvent:
    ev = WebhookEvent(event=name, room=Room(name=room, sid=f"RM_{room}"))
    if sid:
        ev.participant.CopyFrom(ParticipantInfo(sid=sid, identity=sid.lower()))
    return ev


def room_events(room: str, n: int) -> list[WebhookEvent]:
    return [event("participant_joined", room, f"PA_{room}{i}") for i in range(n)]


async def test_a_long_outage_is_retried_until_everything_arrives_in_order(client, make_receiver) -> None:
    down = await make_receiver(statuses=[503] * 40)  # far past any fixed number of attempts
    other = await make_receiver()
    box = outbox(client, [down.url, other.url], "node-a")
    await box.start()
    try:
        a, b = room_events("a", 5), room_events("b", 3)
        for ev in [x for pair in zip(a, b) for x in pair] + a[3:]:
            box.notify(ev)
        assert await box.flush()
        await other.wait_for(8, timeout=5)  # a dead receiver delays no other
        await down.wait_for(8, timeout=20)
    finally:
        await box.stop(1.0)
    for receiver in (down, other):
        assert receiver.errors == []
        got = [d.event for d in receiver.deliveries]
        assert [e.id for e in got if e.room.name == "a"] == [e.id for e in a]
        assert [e.id for e in got if e.room.name == "b"] == [e.id for e in b]
        assert len(set(receiver.ids())) == 8
    assert down.requests >= 40 + 8
    assert box.stats()[0].sent == 8 and box.num_dropped == 0


async def test_another_node_takes_over_and_resends_with_the_same_id(client, make_receiver) -> None:
    receiver = await make_receiver(statuses=[503] * 1000)
    first = outbox(client, [receiver.url], "node-a")
    await first.start()
    events = room_events("r", 3)
    for ev in events:
        first.notify(ev)
    assert await first.flush()
    while receiver.requests < 3:  # node-a is retrying the first event
        await asyncio.sleep(0.02)
    for task in [*first._tasks, *first._rooms.values()]:  # dies without a word (its lease just expires)
        task.cancel()
    await asyncio.sleep(0.1)
    receiver.statuses.clear()
    second = outbox(client, [receiver.url], "node-b")
    await second.start()
    try:
        await receiver.wait_for(3, timeout=15)
    finally:
        await second.stop(1.0)
        await first.stop(0.1)
    assert receiver.ids() == [e.id for e in events]


async def test_one_event_per_id_whichever_node_reports_it(client, make_receiver) -> None:
    receiver = await make_receiver()
    a, b = outbox(client, [receiver.url], "node-a"), outbox(client, [receiver.url], "node-b")
    await a.start()
    await b.start()
    try:
        # Both nodes end the same session (its own node and a peer that saw its node die): one webhook.
        a.notify(event("participant_left", "r", "PA_x"))
        b.notify(event("participant_left", "r", "PA_x"))
        b.notify(event("participant_left", "r", "PA_y"))
        await receiver.wait_for(2, timeout=5)
        await asyncio.sleep(0.5)
    finally:
        await a.stop(1.0)
        await b.stop(1.0)
    assert sorted(d.event.participant.sid for d in receiver.deliveries) == ["PA_x", "PA_y"]


async def test_a_participant_reported_joined_ends_as_left_whoever_ends_it(client, make_receiver) -> None:
    """A peer that never heard a participant become active ends it as a connection that never came up; if its own
    node had already sent participant_joined, the backend gets participant_left instead (LiveKit never sends
    aborted after joined), and a joined arriving after the end is not sent at all."""
    receiver = await make_receiver()
    a, b = outbox(client, [receiver.url], "node-a"), outbox(client, [receiver.url], "node-b")
    await a.start()
    await b.start()
    try:
        a.notify(event("participant_joined", "c", "PA_bob"))
        assert await a.flush()
        b.notify(event("participant_connection_aborted", "c", "PA_bob"))  # the peer, knowing only JOINED
        a.notify(event("participant_left", "c", "PA_bob"))  # his own node, later: the same end, sent once
        b.notify(event("participant_connection_aborted", "c", "PA_eve"))  # never joined: aborted it is
        assert await b.flush()
        a.notify(event("participant_joined", "c", "PA_eve"))  # her node, after the peer ended her: not sent
        await receiver.wait_for(3, timeout=5)
        await asyncio.sleep(0.5)
    finally:
        await a.stop(1.0)
        await b.stop(1.0)
    got = [(d.event.event, d.event.participant.sid) for d in receiver.deliveries]
    assert got == [("participant_joined", "PA_bob"), ("participant_left", "PA_bob"),
                   ("participant_connection_aborted", "PA_eve")]


async def test_retention_bounds_the_outbox_and_counts_what_it_dropped(client, make_receiver) -> None:
    receiver = await make_receiver()
    writer = outbox(client, [receiver.url], "writer", deliver=False, max_events=3, retention=2.0)
    await writer.start()
    old = room_events("old", 2)
    for ev in old:
        writer.notify(ev)
    assert await writer.flush()
    await asyncio.sleep(2.2)  # "old" is now past retention
    late = event("participant_joined", "old", "PA_late")
    many = room_events("many", 5)  # two more than a room keeps
    for ev in [late, *many]:
        writer.notify(ev)
    assert await writer.flush()
    assert await client.xlen("braid:{room:many}:hooks") == 3
    deliverer = outbox(client, [receiver.url], "deliverer", max_events=3, retention=2.0)
    await deliverer.start()
    try:
        await receiver.wait_for(4, timeout=5)
    finally:
        await deliverer.stop(1.0)
        await writer.stop(0.1)
    got = {d.event.id: d.event.num_dropped for d in receiver.deliveries}
    assert got == {late.id: 2, many[2].id: 2, many[3].id: 0, many[4].id: 0}
    assert deliverer.num_dropped == 4
