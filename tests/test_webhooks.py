"""WebhookNotifier against real aiohttp receivers on 127.0.0.1, verified with livekit-api's WebhookReceiver."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import jwt
import pytest
from aiohttp import web
from livekit.api import TokenVerifier, WebhookReceiver
from livekit.protocol.models import ParticipantInfo, Room
from livekit.protocol.webhook import WebhookEvent

from braid.shared.auth import body_sha256
from braid.shared.config import Config, WebhookConfig
from braid.shared.webhooks import (
    CONTENT_TYPE,
    NullNotifier,
    WebhookNotifier,
    encode_event,
    notifier_from_config,
)

KEY, SECRET = "webhookkey", "webhook-secret-long-enough-for-hs256-0123"


@dataclass
class Delivery:
    body: bytes
    headers: dict[str, str]
    event: WebhookEvent
    received_at: float


@dataclass
class Receiver:
    """An HTTP endpoint that verifies every POST like a LiveKit user's webhook handler would."""

    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)
    requests: int = 0
    statuses: list[int] = field(default_factory=list)  # answered in turn; 200 once exhausted
    delay: float = 0.0
    errors: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.Response(status=status, text="nope")
        try:
            auth = request.headers.get("Authorization", "")
            event = WebhookReceiver(TokenVerifier(KEY, SECRET)).receive(body.decode("utf-8"), auth)
        except Exception as exc:  # recorded, and the test fails on it
            self.errors.append(repr(exc))
            return web.Response(status=401, text=str(exc))
        self.deliveries.append(Delivery(body, dict(request.headers), event, time.monotonic()))
        self.arrived.set()
        return web.Response(text="ok")

    def ids(self) -> list[str]:
        return [d.event.id for d in self.deliveries]

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async def enough() -> None:
            while len(self.deliveries) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout)


@pytest.fixture
async def make_receiver() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def make(**kwargs: object) -> Receiver:
        receiver = Receiver(**kwargs)  # type: ignore[arg-type]
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock)
        await site.start()
        receiver.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        runners.append(runner)
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()


def dead_url() -> str:
    """A port that was just free and has nothing listening: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def room_event(name: str = "room_started", room: str = "r1", **kwargs: object) -> WebhookEvent:
    room_info = Room(name=room, sid="RM_abcdefghijkl", creation_time=1700000000)
    return WebhookEvent(event=name, room=room_info, **kwargs)  # type: ignore[arg-type]


def notifier(urls: list[str], **kwargs: object) -> WebhookNotifier:
    kwargs.setdefault("timeout", 1.0)
    kwargs.setdefault("backoff_initial", 0.02)
    kwargs.setdefault("backoff_max", 0.1)
    return WebhookNotifier(urls, KEY, SECRET, **kwargs)  # type: ignore[arg-type]


async def test_delivery_is_signed_like_livekit(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    receiver = await make_receiver()
    n = notifier([receiver.url])
    await n.start()
    try:
        event = room_event(participant=ParticipantInfo(identity="alice", sid="PA_x", joined_at=1700000001))
        n.notify(event)
        await receiver.wait_for(1)
    finally:
        await n.stop(1.0)
    assert receiver.errors == []
    delivery = receiver.deliveries[0]

    # notify() filled id and created_at on the caller's event, and that is what was sent.
    assert event.id.startswith("EV_") and len(event.id) > 3
    assert abs(event.created_at - time.time()) < 10
    assert delivery.event.id == event.id
    assert delivery.event.created_at == event.created_at
    assert delivery.event.room.name == "r1"

    # The body: compact camelCase protojson, defaults omitted, int64 as strings.
    raw = json.loads(delivery.body)
    assert raw["createdAt"] == str(event.created_at)
    assert "created_at" not in raw
    assert raw["id"].startswith("EV_")
    assert raw["room"]["creationTime"] == "1700000000"
    assert raw["participant"]["joinedAt"] == "1700000001"
    assert "numDropped" not in raw and "egressInfo" not in raw
    assert delivery.body == encode_event(event)
    assert b" " not in delivery.body

    # Headers as LiveKit sends them.
    headers = {k.lower(): v for k, v in delivery.headers.items()}
    assert headers["content-type"] == CONTENT_TYPE
    assert headers["user-agent"] == "Braid"
    auth = headers["authorization"]
    assert not auth.lower().startswith("bearer")
    claims = jwt.decode(auth, SECRET, algorithms=["HS256"], issuer=KEY)
    assert claims["sha256"] == body_sha256(delivery.body)
    assert claims["exp"] - claims["nbf"] == 300
    assert "iat" in claims


async def test_retries_5xx_then_delivers_once_in_order(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    receiver = await make_receiver(statuses=[500, 500])
    n = notifier([receiver.url])
    await n.start()
    try:
        first, second = room_event("room_started"), room_event("room_finished")
        n.notify(first)
        n.notify(second)
        await receiver.wait_for(2)
        await asyncio.sleep(0.1)  # nothing more should arrive
    finally:
        await n.stop(1.0)
    assert receiver.errors == []
    assert receiver.requests == 4  # 500, 500, then one each
    assert receiver.ids() == [first.id, second.id]
    assert [d.event.event for d in receiver.deliveries] == ["room_started", "room_finished"]
    (stats,) = n.stats()
    assert (stats.sent, stats.failed, stats.dropped) == (2, 0, 0)


async def test_429_is_retried_other_4xx_is_not(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    receiver = await make_receiver(statuses=[429, 400])
    n = notifier([receiver.url])
    await n.start()
    try:
        first, second = room_event("room_started"), room_event("room_finished")
        n.notify(first)  # 429, then 400: given up without further retries
        n.notify(second)
        await receiver.wait_for(1)
        await asyncio.sleep(0.2)
    finally:
        await n.stop(1.0)
    assert receiver.requests == 3
    assert receiver.ids() == [second.id]
    (stats,) = n.stats()
    assert (stats.sent, stats.failed) == (1, 1)


async def test_bounded_attempts(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    receiver = await make_receiver(statuses=[503] * 10)
    n = notifier([receiver.url], max_attempts=3)
    await n.start()
    try:
        n.notify(room_event())
        deadline = time.monotonic() + 3
        while n.stats()[0].failed == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await n.stop(1.0)
    assert receiver.requests == 3
    assert n.stats()[0].failed == 1


async def test_dead_and_slow_receivers_do_not_delay_a_healthy_one(
    make_receiver: Callable[..., Awaitable[Receiver]],
) -> None:
    slow = await make_receiver(delay=5.0)
    healthy = await make_receiver()
    # One blocked request to the slow receiver lasts 3 s; the healthy one must be done long before.
    n = notifier([dead_url(), slow.url, healthy.url], timeout=3.0, max_attempts=5)
    await n.start()
    try:
        started = time.monotonic()
        events = [room_event(room=f"r{i}") for i in range(5)]
        for event in events:
            n.notify(event)
        await healthy.wait_for(5, timeout=2.0)
        assert time.monotonic() - started < 1.5
        assert healthy.ids() == [e.id for e in events]
        assert slow.deliveries == []
    finally:
        t0 = time.monotonic()
        await n.stop(0.2)
        assert time.monotonic() - t0 < 1.0
    assert healthy.errors == []


async def test_notify_never_blocks(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    slow = await make_receiver(delay=5.0)
    n = notifier([slow.url, dead_url()], queue_size=1000)
    await n.start()
    try:
        t0 = time.monotonic()
        for i in range(500):
            n.notify(room_event(room=f"r{i}"))
        assert time.monotonic() - t0 < 0.5
    finally:
        await n.stop(0.1)


async def test_order_per_url(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    a = await make_receiver(statuses=[500, 502, 200, 503])
    b = await make_receiver(delay=0.01)
    n = notifier([a.url, b.url])
    await n.start()
    try:
        events = [room_event(name, room="ordered") for name in (
            "room_started", "participant_joined", "track_published", "track_unpublished",
            "participant_left", "room_finished",
        )]
        for event in events:
            n.notify(event)
        await asyncio.gather(a.wait_for(6), b.wait_for(6))
    finally:
        await n.stop(1.0)
    assert a.ids() == [e.id for e in events]
    assert b.ids() == [e.id for e in events]
    # The same bytes went to every receiver.
    assert [d.body for d in a.deliveries] == [d.body for d in b.deliveries]


async def test_a_participant_reported_joined_ends_as_left(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    """The single-process notifier keeps the outbox's rule (webhooks.coherence): aborted after joined goes out
    as participant_left; joined after the end is not sent."""
    receiver = await make_receiver()
    n = notifier([receiver.url])
    await n.start()
    try:
        joined, aborted = room_event("participant_joined", room="c"), room_event("participant_connection_aborted",
                                                                                  room="c")
        joined.participant.sid = aborted.participant.sid = "PA_bob"
        late = room_event("participant_joined", room="c")
        late.participant.sid = "PA_other"
        ended = room_event("participant_left", room="c")
        ended.participant.sid = "PA_other"
        for event in (joined, aborted, ended, late):
            n.notify(event)
        await receiver.wait_for(3)
        await asyncio.sleep(0.3)
    finally:
        await n.stop(1.0)
    assert [(d.event.event, d.event.participant.sid) for d in receiver.deliveries] == [
        ("participant_joined", joined.participant.sid), ("participant_left", joined.participant.sid),
        ("participant_left", "PA_other")]


async def test_full_queue_drops_oldest_and_reports_num_dropped(
    make_receiver: Callable[..., Awaitable[Receiver]],
) -> None:
    receiver = await make_receiver()
    n = notifier([receiver.url], queue_size=2)
    events = [room_event(room=f"r{i}") for i in range(5)]
    for event in events:  # not started yet: everything stays queued
        n.notify(event)
    assert n.num_dropped == 3
    await n.start()
    try:
        n_later = room_event(room="later")
        await receiver.wait_for(2)
        n.notify(n_later)
        await receiver.wait_for(3)
    finally:
        await n.stop(1.0)
    assert receiver.errors == []
    assert receiver.ids() == [events[3].id, events[4].id, n_later.id]
    assert [d.event.num_dropped for d in receiver.deliveries] == [3, 0, 0]
    assert json.loads(receiver.deliveries[0].body)["numDropped"] == 3


async def test_stop_flushes_queued_events(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    receiver = await make_receiver(delay=0.01)
    n = notifier([receiver.url])
    await n.start()
    events = [room_event(room=f"r{i}") for i in range(10)]
    for event in events:
        n.notify(event)
    await n.stop(5.0)
    assert receiver.ids() == [e.id for e in events]
    n.notify(room_event())  # after stop: dropped with a log line, no error
    await n.stop(1.0)  # idempotent


async def test_stop_returns_promptly_with_stuck_receivers(
    make_receiver: Callable[..., Awaitable[Receiver]],
) -> None:
    slow = await make_receiver(delay=30.0)
    n = notifier([slow.url, dead_url()], timeout=10.0, max_attempts=5, backoff_initial=5.0, backoff_max=5.0)
    await n.start()
    for i in range(3):
        n.notify(room_event(room=f"r{i}"))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await n.stop(0.3)
    assert time.monotonic() - t0 < 1.0
    assert all(s.dropped == 3 for s in n.stats())
    mine = [t for t in asyncio.all_tasks() if t.get_name().startswith("webhook-sender")]
    assert mine == []


async def test_session_factory_is_used_and_closed(make_receiver: Callable[..., Awaitable[Receiver]]) -> None:
    receiver = await make_receiver()
    sessions: list[aiohttp.ClientSession] = []

    def factory() -> aiohttp.ClientSession:
        sessions.append(aiohttp.ClientSession())
        return sessions[-1]

    n = notifier([receiver.url], session_factory=factory)
    await n.start()
    n.notify(room_event())
    await receiver.wait_for(1)
    await n.stop(1.0)
    assert len(sessions) == 1 and sessions[0].closed


async def test_null_notifier_and_factory() -> None:
    null = NullNotifier()
    await null.start()
    null.notify(room_event())
    await null.stop(0.1)

    config = Config(keys={"k1": "s1", "k2": "s2"})
    assert isinstance(notifier_from_config(config), NullNotifier)

    config.webhook = WebhookConfig(urls=["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"], api_key="k2",
                                   timeout=2.5, max_attempts=3)
    built = notifier_from_config(config)
    assert isinstance(built, WebhookNotifier)
    assert built.urls == config.webhook.urls
    assert (built.timeout, built.max_attempts) == (2.5, 3)
    assert built._api_key == "k2" and built._api_secret == "s2"

    config.webhook.api_key = ""
    built = notifier_from_config(config)
    assert isinstance(built, WebhookNotifier) and built._api_key == "k1"


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        WebhookNotifier(["http://x"], "", "s")
    with pytest.raises(ValueError):
        WebhookNotifier(["http://x"], "k", "s", max_attempts=0)
