"""A bounded drain: SIGTERM on a media node moves its participants to another node, calls continue.

Real processes on a private redis-server: a router, a signal edge and two media nodes; official Python SDK
clients; webhooks verified with `WebhookReceiver`.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import time
import urllib.error
import urllib.request

import pytest
from livekit import api

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .servers import free_port

pytestmark = pytest.mark.timeout(150)

KEY, SECRET = "drainkey", "a-drain-test-secret-long-enough"


def _env(redis, webhook_url: str, port_start: int = 0) -> dict[str, str]:
    env = {"BRAID_KEYS": f"{KEY}: {SECRET}", "BRAID_REDIS__ADDRESS": redis.address,
           "BRAID_WEBHOOK__URLS": webhook_url, "BRAID_DRAIN_DEADLINE": "30"}
    if port_start:
        env["BRAID_RTC__PORT_RANGE_START"] = str(port_start)
        env["BRAID_RTC__PORT_RANGE_END"] = str(port_start + 499)
    return env


def _port_range_base() -> int:
    """A random 500-port UDP range, so parallel or leftover servers never share one."""
    import random

    return random.randrange(20000, 39500, 500)


def _media(server_factory, redis, sink, router_grpc: str, port_start: int):
    return server_factory("--role", "media", "--router-address", router_grpc, dev=False,
                          env=_env(redis, sink.url, port_start))


def _frames(obs: Observer, sender: str) -> int:
    got = obs.received.get(sender)
    return got.frames if got else 0


async def test_sigterm_moves_participants_to_another_node(server_factory, redis_server, webhook_sink, room_name):
    grpc_port = free_port()
    router_grpc = f"127.0.0.1:{grpc_port}"
    server_factory("--role", "router", "--grpc-port", str(grpc_port), dev=False,
                   env=_env(redis_server, webhook_sink.url))
    media_a = _media(server_factory, redis_server, webhook_sink, router_grpc, _port_range_base())
    signal_node = server_factory("--role", "signal", "--router-address", router_grpc, dev=False,
                                 env=_env(redis_server, webhook_sink.url))
    alice, bob = Observer("alice"), Observer("bob")
    media = [DemoMedia(frequency=440), DemoMedia(frequency=660)]
    try:
        for obs, demo in zip((alice, bob), media):
            await obs.connect(signal_node.ws_url, join_token(KEY, SECRET, room_name, obs.identity))
            await demo.start(obs.room)
        assert await wait_until(lambda: _frames(alice, "bob") > 10 and _frames(bob, "alice") > 10, 20)
        sids = {o.identity: o.room.local_participant.sid for o in (alice, bob)}

        # A second node joins the cluster; then the first is told to terminate.
        media_b = _media(server_factory, redis_server, webhook_sink, router_grpc, _port_range_base())
        media_a.proc.send_signal(signal.SIGTERM)
        drained_at = time.monotonic()

        with urllib.request.urlopen(media_b.http_url + "/readyz", timeout=2) as resp:
            assert resp.status == 200
        before = {"alice": _frames(bob, "alice"), "bob": _frames(alice, "bob")}
        flowing = await wait_until(
            lambda: _frames(bob, "alice") > before["alice"] + 30 and _frames(alice, "bob") > before["bob"] + 30, 10)
        moved_in = time.monotonic() - drained_at
        assert flowing, f"media after the move: {alice.events[-8:]} {bob.events[-8:]}\n{media_b.log()[-3000:]}"
        assert moved_in < 10, f"media flowed again {moved_in:.1f}s after SIGTERM"
        print(f"media flowing again {moved_in:.1f}s after SIGTERM")
        assert {o.identity: o.room.local_participant.sid for o in (alice, bob)} == sids, "a move keeps the sid"
        code = await asyncio.to_thread(media_a.proc.wait, 35)
        assert code == 0, "the drained node exits by itself"
        assert "drained" in media_a.log()

        receiver = api.WebhookReceiver(api.TokenVerifier(KEY, SECRET))
        events = [receiver.receive(d.body, d.authorization) for d in webhook_sink.for_room(room_name)]
        names = [(e.event, e.participant.identity) for e in events if e.event.startswith("participant")]
        assert sorted(names) == [("participant_joined", "alice"), ("participant_joined", "bob")], names
    finally:
        for demo in media:
            await demo.stop()
        await alice.close()
        await bob.close()

    # Leaving for real from the new node is reported exactly once each.
    def lefts() -> list[str]:
        return sorted(d.event["participant"]["identity"] for d in webhook_sink.for_room(room_name)
                      if d.event["event"] == "participant_left")

    assert await wait_until(lambda: len(lefts()) >= 2, 15)
    await asyncio.sleep(1.0)
    assert lefts() == ["alice", "bob"]


async def test_admin_drain_requires_a_key_and_ends_the_node(server_factory, redis_server, webhook_sink):
    import json

    media = _media(server_factory, redis_server, webhook_sink, "", _port_range_base())
    url = media.http_url + "/admin/drain"

    def call(method: str, token: str | None) -> tuple[int, dict]:
        request = urllib.request.Request(url, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    token = api.AccessToken(KEY, SECRET).with_identity("operator").with_grants(
        api.VideoGrants(room_admin=True)).to_jwt()
    forged = api.AccessToken(KEY, "wrong-secret-wrong-secret").with_identity("operator").with_grants(
        api.VideoGrants(room_admin=True)).to_jwt()
    join_token = api.AccessToken(KEY, SECRET).with_identity("guest").with_grants(
        api.VideoGrants(room_join=True, room="r")).to_jwt()
    one_room_admin = api.AccessToken(KEY, SECRET).with_identity("mod").with_grants(
        api.VideoGrants(room_admin=True, room="r")).to_jwt()
    assert (await asyncio.to_thread(call, "GET", None))[0] == 401
    assert (await asyncio.to_thread(call, "POST", forged))[0] == 401
    assert (await asyncio.to_thread(call, "POST", join_token))[0] == 403, "a join token cannot drain a node"
    assert (await asyncio.to_thread(call, "POST", one_room_admin))[0] == 403
    assert (await asyncio.to_thread(call, "GET", join_token))[0] == 403
    expired = api.AccessToken(KEY, SECRET).with_identity("operator").with_grants(
        api.VideoGrants(room_admin=True)).with_ttl(datetime.timedelta(seconds=-3600)).to_jwt()
    assert (await asyncio.to_thread(call, "POST", expired))[0] == 401
    assert media.log().count("/admin/drain refused") >= 5
    status, body = await asyncio.to_thread(call, "GET", token)
    assert status == 200 and body["state"] == "SERVING" and body["participants"] == 0
    status, body = await asyncio.to_thread(call, "POST", token)
    assert status == 202 and body["state"] == "DRAINING"
    assert await asyncio.to_thread(media.proc.wait, 15) == 0, "an empty node's drain ends at once and it exits"
