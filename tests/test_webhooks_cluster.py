"""Webhooks of a real cluster through failures: every event verified with livekit-api's WebhookReceiver, and the exact
multiset the backend receives checked: one `participant_joined` and one final event per session, one
`track_unpublished` per `track_published`, ids never repeated, `room_started` / `room_finished` once.

Real processes (router, signal, media nodes) on a private redis-server; official Python SDK clients.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import urllib.request

import pytest
import redis
from livekit import api

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .cluster import KEY, SECRET, start_cluster, stop_cluster, wait_for
from .servers import free_port, start_server, start_webhook_sink

pytestmark = pytest.mark.timeout(120)

FAST_ROOMS = {"BRAID_ROOM__DEPARTURE_TIMEOUT": "1", "BRAID_ROOM__EMPTY_TIMEOUT": "2"}


def verified(sink, room: str) -> list[api.WebhookEvent]:
    receiver = api.WebhookReceiver(api.TokenVerifier(KEY, SECRET))
    return [receiver.receive(d.body, d.authorization) for d in sink.for_room(room)]


def assert_balanced(events: list[api.WebhookEvent]) -> dict[str, api.WebhookEvent]:
    """Exactly once everything; returns each session's final event by sid."""
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    names = collections.Counter(e.event for e in events)
    assert names["room_started"] == 1 and names["room_finished"] == 1, names
    joined = collections.Counter(e.participant.sid for e in events if e.event == "participant_joined")
    ended = collections.Counter(e.participant.sid for e in events
                                if e.event in ("participant_left", "participant_connection_aborted"))
    assert set(joined.values()) <= {1} and set(ended.values()) <= {1}, (joined, ended)
    left = {e.participant.sid for e in events if e.event == "participant_left"}
    assert set(joined) == left, (joined, ended)  # LiveKit's rule: joined (once active) ends as left, else aborted
    published = collections.Counter(e.track.sid for e in events if e.event == "track_published")
    unpublished = collections.Counter(e.track.sid for e in events if e.event == "track_unpublished")
    assert set(published.values()) <= {1} and published == unpublished, (published, unpublished)
    order = [e.event for e in events]
    assert order.index("room_started") == 0 and order[-1] == "room_finished", order
    return {e.participant.sid: e for e in events if e.event in ("participant_left", "participant_connection_aborted")}


async def _join(node, room: str, identity: str, **grants) -> Observer:
    obs = Observer(identity)
    await obs.connect(node.server.ws_url, join_token(KEY, SECRET, room, identity, **grants))
    return obs


async def _room_finished(sink, room: str, timeout: float = 20) -> list[api.WebhookEvent]:
    assert await wait_for(lambda: any(d.event["event"] == "room_finished" for d in sink.for_room(room)), timeout), [
        d.event["event"] for d in sink.for_room(room)]
    await asyncio.sleep(1.5)  # anything sent twice would have arrived by now
    return verified(sink, room)


async def test_killed_media_node_each_session_ends_once(tmp_path, redis_server, webhook_sink, room_name):
    """kill -9 of alice's node: her SDK rejoins on another node within a second or two as a new session, which ends
    the old one (DUPLICATE_IDENTITY, with its tracks unpublished); nothing else is lost or sent twice."""
    cluster = start_cluster(tmp_path, redis_server, signal_regions=("eu-west",),
                            media_regions=("eu-west", "eu-west", "eu-west"), port_base=53000,
                            env={"BRAID_WEBHOOK__URLS": webhook_sink.url, **FAST_ROOMS},
                            media_env={"BRAID_LIMITS__MAX_PARTICIPANTS": "1"})
    edge = cluster.signals[0]
    a = b = None
    media = DemoMedia(frequency=440)
    try:
        a = await _join(edge, room_name, "alice")
        await media.start(a.room)
        victim = next(n for n in cluster.media if n.participants() == 1)
        # Placement reads the nodes' heartbeats: once alice's node reports itself full, bob goes elsewhere.
        assert await wait_for(lambda: any(n["participants"] == 1 for n in cluster.registry().values()), 10)
        b = await _join(edge, room_name, "bob")
        first_sid = a.room.local_participant.sid
        assert await wait_until(lambda: b.received.get("alice") is not None and b.received["alice"].frames > 5, 20)
        assert await wait_for(lambda: sum(1 for e in verified(webhook_sink, room_name)
                                          if e.event == "track_published") == 2, 10)
        victim.kill()
        assert await wait_until(lambda: a.room.local_participant.sid not in ("", first_sid), 15), a.events[-10:]
        assert await wait_for(lambda: any(e.event == "participant_left" and e.participant.sid == first_sid
                                          for e in verified(webhook_sink, room_name)), 10)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await media.stop()
        for obs in (a, b):
            if obs is not None:
                await obs.close()
    try:
        events = await _room_finished(webhook_sink, room_name)
        ends = assert_balanced(events)
        joined = sorted(e.participant.identity for e in events if e.event == "participant_joined")
        assert joined == ["alice", "alice", "bob"], joined
        assert ends[first_sid].participant.disconnect_reason == api.DisconnectReason.DUPLICATE_IDENTITY
        assert all(e.participant.disconnect_reason == api.DisconnectReason.CLIENT_INITIATED
                   for sid, e in ends.items() if sid != first_sid), ends
        old_tracks = [e for e in events if e.event == "track_unpublished" and e.participant.sid == first_sid]
        assert len(old_tracks) == 2
    finally:
        stop_cluster(cluster)


async def test_node_killed_with_events_queued_and_receiver_down(tmp_path, redis_server, room_name):
    """The receiver is down while a whole call happens; the node delivering the room's webhooks is killed with all
    of them queued. When the receiver comes back, the nodes left deliver every event, once each, in order."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/webhook"
    cluster = start_cluster(tmp_path, redis_server, signal_regions=("eu-west",), media_regions=("eu-west", "eu-west"),
                            port_base=54000, env={"BRAID_WEBHOOK__URLS": url, "BRAID_WEBHOOK__RETRY_MAX_INTERVAL": "1",
                                                  **FAST_ROOMS})
    r = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=2)
    sink = None
    try:
        a = await _join(cluster.signals[0], room_name, "alice")
        b = await _join(cluster.signals[0], room_name, "bob")
        await asyncio.sleep(1.0)
        await a.close()
        await b.close()
        stream = f"braid:{{room:{room_name}}}:hooks"
        # room_started, 2 joined, 2 left, room_finished: all in the outbox, none delivered.
        assert await wait_for(lambda: r.xlen(stream) == 6, 20), r.xrange(stream)
        holder = (r.get(f"braid:lease:hooks:{room_name}") or b"").decode()
        by_id = {f"ND_media{i + 1}": n for i, n in enumerate(cluster.media)}
        victim = by_id.get(holder, cluster.router)
        os.kill(victim.pid, signal.SIGKILL)
        victim.server.proc.wait()
        await asyncio.sleep(2.0)  # still down, and retried meanwhile
        sink = start_webhook_sink(port)
        assert await wait_for(lambda: len(sink.for_room(room_name)) >= 6, 30), r.xrange(stream)
        await asyncio.sleep(1.5)
        events = verified(sink, room_name)
        assert_balanced(events)
        assert [e.event for e in events] == ["room_started", "participant_joined", "participant_joined",
                                             "participant_left", "participant_left", "room_finished"]
        assert await wait_for(lambda: r.xlen(stream) == 0, 10), "delivered events are removed"
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        r.close()
        if sink is not None:
            sink.server.shutdown()
        stop_cluster(cluster)


def _admin(url: str, method: str) -> int:
    token = api.AccessToken(KEY, SECRET).with_identity("operator").with_grants(
        api.VideoGrants(room_admin=True)).to_jwt()
    request = urllib.request.Request(url + "/admin/drain", method=method, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.status


async def test_drain_started_then_cancelled_and_hidden_participants(server_factory, redis_server, webhook_sink,
                                                                    room_name):
    """A drain cancelled right after it started: whoever was already told moves (same sid, no webhooks for the
    move), the others stay; a hidden participant is reported like any other. Each session: one joined, one left;
    tracks published once."""
    grpc_port = free_port()
    router = f"127.0.0.1:{grpc_port}"
    env = {"BRAID_KEYS": f"{KEY}: {SECRET}", "BRAID_REDIS__ADDRESS": redis_server.address,
           "BRAID_WEBHOOK__URLS": webhook_sink.url, **FAST_ROOMS}
    server_factory("--role", "router", "--grpc-port", str(grpc_port), dev=False, env=env)
    ports = iter(range(55000, 56000, 250))

    def media_node():
        start = next(ports)
        return server_factory("--role", "media", "--router-address", router, dev=False, env={
            **env, "BRAID_RTC__PORT_RANGE_START": str(start), "BRAID_RTC__PORT_RANGE_END": str(start + 249)})

    first = media_node()
    edge = server_factory("--role", "signal", "--router-address", router, dev=False, env=env)
    observers: list[Observer] = []
    media = DemoMedia(frequency=440)
    try:
        for identity, grants in (("alice", {}), ("bob", {}), ("carol", {}), ("recorder", {"hidden": True})):
            obs = Observer(identity)
            await obs.connect(edge.ws_url, join_token(KEY, SECRET, room_name, identity, **grants))
            observers.append(obs)
        await media.start(observers[0].room)
        sids = {o.identity: o.room.local_participant.sid for o in observers}
        assert await wait_for(lambda: sum(1 for e in verified(webhook_sink, room_name)
                                          if e.event == "track_published") == 2, 10)
        media_node()
        await asyncio.to_thread(_admin, first.http_url, "POST")
        await asyncio.to_thread(_admin, first.http_url, "DELETE")
        await asyncio.sleep(4.0)  # the moves under way finish
        assert {o.identity: o.room.local_participant.sid for o in observers} == sids, "a move keeps the sid"
        with urllib.request.urlopen(first.http_url + "/readyz", timeout=2) as resp:
            assert resp.status == 200, "serving again"
    finally:
        await media.stop()
        for obs in observers:
            await obs.close()
    events = await _room_finished(webhook_sink, room_name)
    ends = assert_balanced(events)
    assert sorted(e.participant.identity for e in events if e.event == "participant_joined") == [
        "alice", "bob", "carol", "recorder"]
    assert {e.participant.sid for e in ends.values()} == set(sids.values())
    assert sum(1 for e in events if e.event == "track_published") == 2


async def test_router_restart_loses_and_repeats_nothing(tmp_path, redis_server, webhook_sink, room_name):
    """kill -9 of the only router mid-call, then a new one: the call goes on; the backend still gets each
    participant's events once and one room_finished (from the new router's reaper)."""
    env = {"BRAID_WEBHOOK__URLS": webhook_sink.url, **FAST_ROOMS}
    cluster = start_cluster(tmp_path, redis_server, signal_regions=("eu-west",), media_regions=("eu-west",),
                            port_base=56000, env=env)
    a = b = None
    try:
        a = await _join(cluster.signals[0], room_name, "alice")
        b = await _join(cluster.signals[0], room_name, "bob")
        assert await wait_for(lambda: sum(1 for e in verified(webhook_sink, room_name)
                                          if e.event == "participant_joined") == 2, 10)
        cluster.router.kill()
        cluster.router.server = start_server(
            tmp_path, "--config", str(tmp_path / "regions.yaml"), "--role", "router", "--grpc-port",
            str(cluster.router.grpc_port), dev=False,
            env={"BRAID_KEYS": f"{KEY}: {SECRET}", "BRAID_REDIS__ADDRESS": redis_server.address, **env})
        await asyncio.sleep(1.0)
        c = await _join(cluster.signals[0], room_name, "carol")  # placed by the new router
        await c.close()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        for obs in (a, b):
            if obs is not None:
                await obs.close()
    try:
        events = await _room_finished(webhook_sink, room_name)
        assert_balanced(events)
        assert sorted(e.participant.identity for e in events if e.event == "participant_left") == [
            "alice", "bob", "carol"]
    finally:
        stop_cluster(cluster)


async def test_stalled_node_expired_by_its_peer_is_reported_once(tmp_path, redis_server, webhook_sink, room_name):
    """bob's media node stops (SIGSTOP) long enough for alice's node to hear nothing from it on the bus and expire
    bob, and for its registry entry to lapse; then it goes on (SIGCONT). Whoever ends bob's session (the peer that
    found his node gone, or his own node later) sends its webhook, and only once."""
    cluster = start_cluster(tmp_path, redis_server, signal_regions=("eu-west",), media_regions=("eu-west", "eu-west"),
                            port_base=57000, env={"BRAID_WEBHOOK__URLS": webhook_sink.url, **FAST_ROOMS},
                            media_env={"BRAID_LIMITS__MAX_PARTICIPANTS": "1"})
    a = b = None
    try:
        a = await _join(cluster.signals[0], room_name, "alice")
        stalled = next(n for n in cluster.media if n.participants() == 0)
        assert await wait_for(lambda: any(n["participants"] == 1 for n in cluster.registry().values()), 10)
        b = await _join(cluster.signals[0], room_name, "bob")
        assert stalled.participants() == 1
        assert await wait_until(lambda: "bob" in {p.identity for p in a.room.remote_participants.values()}, 10)
        # Bob connected (his node sends participant_joined once he is ACTIVE), and alice's node heard so: a stall
        # in the few ms between his connecting and his node telling the others would leave them knowing only that
        # he joined, and they would end him as a connection that never came up (participant_connection_aborted).
        assert await wait_for(lambda: any(d.event["event"] == "participant_joined" and
                                          d.event["participant"]["identity"] == "bob"
                                          for d in webhook_sink.for_room(room_name)), 10)
        await asyncio.sleep(0.5)
        os.kill(stalled.pid, signal.SIGSTOP)
        try:
            assert await wait_until(lambda: "bob" not in {p.identity for p in a.room.remote_participants.values()},
                                    15), "the peer expires bob"
            await asyncio.sleep(1.0)
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
        assert await wait_until(lambda: "bob" in {p.identity for p in a.room.remote_participants.values()}, 20), (
            "bob is back for alice (his node re-announces him, or his SDK rejoined)")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        for obs in (a, b):
            if obs is not None:
                await obs.close()
    try:
        events = await _room_finished(webhook_sink, room_name)
        assert_balanced(events)
        assert {e.participant.identity for e in events if e.event == "participant_left"} == {"alice", "bob"}, [
            (e.event, e.participant.identity, e.participant.sid, e.participant.disconnect_reason) for e in events]
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        stop_cluster(cluster)
