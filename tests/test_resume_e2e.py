"""Resume with the official Python SDK (issue 4): each client's signal WebSocket goes through a TCP proxy the test
cuts, so the SDK resumes (same participant sid, no new join) while media keeps flowing over UDP. Stats and
webhooks must come out as if nothing happened: stats keep flowing past the reap delay, and the webhook receiver
gets exactly one `participant_joined` and one `participant_left` per participant, verified with WebhookReceiver.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from livekit import api

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .proxy import TcpProxy

pytestmark = pytest.mark.timeout(90)
REAP_DELAY = 1.0
STATS_INTERVAL = 0.5


def _env(webhook_sink, analytics, v1: bool = True) -> dict[str, str]:
    env = {
        "BRAID_WEBHOOK__URLS": webhook_sink.url,
        "BRAID_TELEMETRY__WORKER_REAP_DELAY": str(REAP_DELAY),
        "BRAID_TELEMETRY__STATS_INTERVAL": str(STATS_INTERVAL),
        "BRAID_TELEMETRY__ANALYTICS_PATH": str(analytics),
        "BRAID_ROOM__DEPARTURE_TIMEOUT": "1",
    }
    if not v1:
        env["BRAID_RTC__ENABLE_V1"] = "false"
    return env


class Client(Observer):
    """An Observer that records the SDK's reconnecting/reconnected events."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.room.on("reconnecting", lambda: self.events.append(("reconnecting", "")))
        self.room.on("reconnected", lambda: self.events.append(("reconnected", "")))

    def count(self, event: str) -> int:
        return sum(1 for e, _ in self.events if e == event)


async def _connect(server, proxy: TcpProxy, room: str, identity: str) -> Client:
    client = Client(identity)
    await client.connect(proxy.ws_url, join_token(server.api_key, server.api_secret, room, identity))
    return client


def _frames(client: Client, sender: str) -> tuple[int, int]:
    got = client.received.get(sender)
    return (got.frames, len(got.samples)) if got is not None else (0, 0)


def _webhooks(server, webhook_sink, room: str) -> list[api.WebhookEvent]:
    """Every delivery for `room`, each verified (signature and body hash) with livekit-api's WebhookReceiver."""
    receiver = api.WebhookReceiver(api.TokenVerifier(server.api_key, server.api_secret))
    events = []
    for delivery in webhook_sink.for_room(room):
        events.append(receiver.receive(delivery.body, delivery.authorization))
    return events


def _stats_after(path, sid: str, since: float) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("record") == "stats" and record["participant_sid"] == sid and record["end_time"] > since:
            records.append(record)
    return records


def _events(path, sid: str) -> list[str]:
    return [r["type"] for r in map(json.loads, path.read_text().splitlines())
            if r.get("record") == "event" and r.get("participant_id") == sid]


def _assert_one_joined_one_left(events: list[api.WebhookEvent], sids: dict[str, str]) -> None:
    assert len({e.id for e in events}) == len(events), "event ids are unique"
    for identity, sid in sids.items():
        mine = [e.event for e in events if e.participant.sid == sid and e.event.startswith("participant_")]
        assert mine == ["participant_joined", "participant_left"], (identity, mine)
        assert all(e.participant.identity == identity for e in events if e.participant.sid == sid)


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v0"])
async def test_resume_keeps_media_stats_and_webhooks(server_factory, webhook_sink, room_name, tmp_path, v1):
    analytics = tmp_path / "analytics.jsonl"
    server = server_factory(env=_env(webhook_sink, analytics, v1))
    proxies = [await TcpProxy(server.port).start() for _ in range(2)]
    alice = await _connect(server, proxies[0], room_name, "alice")
    bob = await _connect(server, proxies[1], room_name, "bob")
    media = [DemoMedia(frequency=440), DemoMedia(frequency=660)]
    try:
        sids = {"alice": alice.room.local_participant.sid, "bob": bob.room.local_participant.sid}
        await media[0].start(alice.room)
        await media[1].start(bob.room)
        assert await wait_until(lambda: min(*_frames(bob, "alice"), *_frames(alice, "bob")) >= 10, 20)

        before = (_frames(bob, "alice"), _frames(alice, "bob"))
        cut_at = time.time()
        assert [proxy.cut() for proxy in proxies] == [1, 1]
        burst = [f"during-{i:02d}".encode() for i in range(20)]
        for payload in burst:  # reliable data while the signal is down (the data channel is not)
            await alice.room.local_participant.publish_data(payload, reliable=True, topic="burst")
        assert await wait_until(lambda: alice.count("reconnected") and bob.count("reconnected"), 20), (
            alice.events[-6:], bob.events[-6:], server.log()[-3000:])
        during = (_frames(bob, "alice"), _frames(alice, "bob"))
        # A resume, not a full reconnect: same participants, one new signal connection each.
        assert {"alice": alice.room.local_participant.sid, "bob": bob.room.local_participant.sid} == sids
        assert [p.accepted for p in proxies] == ([2, 2] if v1 else [3, 3])  # v0: /rtc/v1 404 first, then /rtc
        assert server.log().count(" resumed on SignalLink(") == 2
        # A real ICE restart on the same server socket: v1 one PC each, v0 the publisher and subscriber PCs.
        assert await wait_until(lambda: server.log().count("ICE restart completed") == (2 if v1 else 4), 5)
        # Media kept flowing while the signal was down, and keeps flowing after.
        for (f0, s0), (f1, s1) in zip(before, during):
            assert f1 > f0 and s1 > s0, (before, during)
        assert await wait_until(lambda: all(
            f > f1 + 10 and s > s1 + 10
            for (f1, s1), (f, s) in zip(during, (_frames(bob, "alice"), _frames(alice, "bob")))), 10)
        # Reliable data sent across the resume and after it arrives, each message once and in order.
        await alice.room.local_participant.publish_data(b"after-resume", reliable=True, topic="burst")
        assert await wait_until(lambda: any(p.data == b"after-resume" for p in bob.data), 10)
        await asyncio.sleep(0.5)
        assert [p.data for p in bob.data if p.topic == "burst"] == [*burst, b"after-resume"]

        # Past the reap delay, the resumed participants' stats are still written.
        await asyncio.sleep(REAP_DELAY + 3 * STATS_INTERVAL)
        since = cut_at + REAP_DELAY
        assert await wait_until(lambda: all(
            sum(r["packets"] for r in _stats_after(analytics, sid, since) if r["direction"] == direction) > 0
            for sid in sids.values() for direction in ("upstream", "downstream")), 5)
        for sid in sids.values():
            assert "PARTICIPANT_RESUMED" in _events(analytics, sid)
        assert [c.count("participant_disconnected") for c in (alice, bob)] == [0, 0], "nobody saw anyone leave"
    finally:
        for m in media:
            await m.stop()
        await alice.close()
        await bob.close()
        for proxy in proxies:
            await proxy.close()

    def names() -> list[str]:
        return [e.event for e in _webhooks(server, webhook_sink, room_name)]

    assert await wait_until(lambda: "room_finished" in names(), 15), names()
    events = _webhooks(server, webhook_sink, room_name)
    _assert_one_joined_one_left(events, sids)
    order = [e.event for e in events]
    assert order.index("room_finished") > max(i for i, n in enumerate(order) if n == "participant_left")
    assert Counter(order)["track_published"] == 4 and Counter(order)["track_unpublished"] == 4, order
    assert "participant_connection_aborted" not in order
    left = [e for e in events if e.event == "participant_left"]
    assert {e.participant.disconnect_reason for e in left} == {api.DisconnectReason.CLIENT_INITIATED}


async def test_twenty_clients_resume_at_once(server_factory, webhook_sink, room_name, tmp_path):
    server = server_factory(env=_env(webhook_sink, tmp_path / "analytics.jsonl"))
    proxies = [await TcpProxy(server.port).start() for _ in range(20)]
    clients: list[Client] = []
    try:
        clients = list(await asyncio.gather(*(
            _connect(server, proxy, room_name, f"user{i:02d}") for i, proxy in enumerate(proxies))))
        sids = {c.identity: c.room.local_participant.sid for c in clients}
        assert await wait_until(lambda: all(len(c.room.remote_participants) == 19 for c in clients), 20)
        assert sum(proxy.cut() for proxy in proxies) == 20  # all together
        assert await wait_until(lambda: all(c.count("reconnected") for c in clients), 40), (
            [c.identity for c in clients if not c.count("reconnected")])
        assert {c.identity: c.room.local_participant.sid for c in clients} == sids
        assert server.log().count(" resumed on SignalLink(") == 20
        assert await wait_until(lambda: server.log().count("ICE restart completed") == 20, 5)
        assert all(p.accepted == 2 for p in proxies)
        # Everyone still sees everyone, and the data channels still work.
        await clients[0].room.local_participant.publish_data(b"hello-after", reliable=True)
        assert await wait_until(lambda: all(any(p.data == b"hello-after" for p in c.data) for c in clients[1:]), 10)
        assert all(len(c.room.remote_participants) == 19 for c in clients)
        await asyncio.sleep(REAP_DELAY + 2 * STATS_INTERVAL)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        for proxy in proxies:
            await proxy.close()

    def names() -> list[str]:
        return [e.event for e in _webhooks(server, webhook_sink, room_name)]

    assert await wait_until(lambda: names().count("participant_left") >= 20 and "room_finished" in names(), 20), (
        Counter(names()))
    await asyncio.sleep(0.5)  # a duplicate would arrive now
    events = _webhooks(server, webhook_sink, room_name)
    _assert_one_joined_one_left(events, sids)
    counts = Counter(e.event for e in events)
    assert counts == {"room_started": 1, "participant_joined": 20, "participant_left": 20, "room_finished": 1}, counts
