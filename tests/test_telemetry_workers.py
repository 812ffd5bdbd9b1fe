"""Stats workers, reference guards and webhook rules, replayed deterministically with a fake clock (issue 4)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from livekit.protocol import models, webhook
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from braid.services.media.telemetry import (
    JsonLinesSink, OTelMetricsSink, ReferenceCount, ReferenceGuard, StatsWorker, TelemetryService, WorkerKey,
)

DR = models.DisconnectReason
REAP = 180.0
INTERVAL = 30.0


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class RecordingNotifier:
    def __init__(self) -> None:
        self.events: list[webhook.WebhookEvent] = []

    def notify(self, event: webhook.WebhookEvent) -> None:
        self.events.append(event)

    @property
    def names(self) -> list[str]:
        return [e.event for e in self.events]


class RecordingSink:
    def __init__(self) -> None:
        self.stats: list = []
        self.events: list = []

    def record_stats(self, records) -> None:
        self.stats.extend(records)

    def record_event(self, event) -> None:
        self.events.append(event)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]


ROOM = models.Room(sid="RM_room1", name="room1")
ALICE = models.ParticipantInfo(sid="PA_alice", identity="alice", state=models.ParticipantInfo.ACTIVE)
VIDEO = models.TrackInfo(sid="TR_video", type=models.TrackType.VIDEO, mime_type="video/VP8")
AUDIO = models.TrackInfo(sid="TR_audio", type=models.TrackType.AUDIO, mime_type="audio/opus")


class Env:
    def __init__(self, svc: TelemetryService, clock: FakeClock, notifier: RecordingNotifier, sink: RecordingSink):
        self.svc, self.clock, self.notifier, self.sink = svc, clock, notifier, sink

    async def advance(self, seconds: float, step: float = INTERVAL) -> None:
        """Let time pass with a flush every `step`, as the timer would."""
        while seconds > 0:
            dt = min(step, seconds)
            self.clock.t += dt
            seconds -= dt
            await self.svc.tick()

    def worker(self, p: models.ParticipantInfo = ALICE) -> StatsWorker | None:
        return self.svc.worker(ROOM, p.sid)


@pytest.fixture
async def env():
    clock, notifier, sink = FakeClock(), RecordingNotifier(), RecordingSink()
    svc = TelemetryService(notifier, [sink], clock=clock, stats_interval=INTERVAL, reap_delay=REAP)
    await svc.start(periodic=False)
    yield Env(svc, clock, notifier, sink)
    await svc.stop()


def assert_well_formed(events: list[webhook.WebhookEvent], clock: FakeClock) -> None:
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("EV_") for i in ids)
    assert all(0 < e.created_at <= clock.t for e in events)


def start_session(svc: TelemetryService, *, active: bool = True):
    """The participant session joins (sending the event), the first signal connection joins, then ACTIVE."""
    session, sig1 = ReferenceGuard("session"), ReferenceGuard("signal-1")
    svc.participant_joined(ROOM, ALICE, session, send_event=True)
    svc.participant_joined(ROOM, ALICE, sig1, send_event=False)
    if active:
        svc.participant_active(ROOM, ALICE, session)
    return session, sig1


# --- guards ------------------------------------------------------------------------------------------------------


def test_guard_activate_and_release_are_idempotent():
    count, a, b = ReferenceCount(), ReferenceGuard("a"), ReferenceGuard("b")
    assert count.acquire(a) and not count.acquire(a)
    assert count.acquire(b)
    assert count.value == 2
    assert count.release(a) is False and count.release(a) is False
    assert count.value == 1
    assert count.release(b) is True
    assert count.value == 0
    assert not count.acquire(a) and not count.acquire(b)  # spent guards never come back
    assert count.value == 0


def test_released_guard_cannot_activate_and_foreign_guard_untouched():
    fresh, other = ReferenceGuard(), ReferenceCount()
    assert fresh.release() is False  # never activated: spends the guard, moves no count
    assert not ReferenceCount().acquire(fresh)
    g = ReferenceGuard()
    other.acquire(g)
    assert ReferenceCount().release(g) is False  # cannot decrement a count it does not belong to
    assert g.active and other.value == 1


# --- the seed race -----------------------------------------------------------------------------------------------


async def test_seed_race_resume_then_reap_delay_keeps_reporting(env: Env):
    svc, sig2 = env.svc, ReferenceGuard("signal-2")
    session, sig1 = start_session(svc)
    await svc.drain()
    worker = env.worker()
    assert worker is not None and worker.ref_count == 2 and worker.connected

    # Resume: the old WebSocket's counter reports Left, the SDK resumes, the new connection's counter joins.
    svc.participant_left(ROOM, ALICE, sig1, send_event=False, reason=DR.SIGNAL_CLOSE)
    svc.participant_resumed(ROOM, ALICE)
    svc.participant_joined(ROOM, ALICE, sig2, send_event=False)
    await svc.drain()
    assert env.worker() is worker and not worker.closed and worker.ref_count == 2

    await env.advance(REAP * 3)  # far beyond the reap delay, flushing every interval
    assert env.worker() is worker and not worker.closed

    worker.on_upstream(VIDEO.sid, packets=100, bytes=120_000)  # stats of the resumed participant keep flowing
    svc.track_published(ROOM, ALICE, VIDEO)
    await env.advance(INTERVAL)
    assert [(r.track_sid, r.packets, r.kind) for r in env.sink.stats] == [(VIDEO.sid, 100, "video")]

    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    svc.participant_left(ROOM, ALICE, sig2, send_event=False, reason=DR.SIGNAL_CLOSE)
    await svc.drain()
    assert env.notifier.names == ["participant_joined", "track_published", "participant_left"]
    left = env.notifier.events[-1]
    assert left.participant.sid == ALICE.sid and left.participant.disconnect_reason == DR.CLIENT_INITIATED
    assert left.room.name == ROOM.name and env.notifier.events[1].track.sid == VIDEO.sid
    assert_well_formed(env.notifier.events, env.clock)
    assert worker.closed and worker.closed_at == env.clock.t
    assert env.sink.types == ["PARTICIPANT_JOINED", "PARTICIPANT_ACTIVE", "PARTICIPANT_RESUMED",
                              "TRACK_PUBLISHED", "PARTICIPANT_LEFT"]

    await env.advance(REAP + INTERVAL)
    assert env.worker() is None


# --- LiveKit PR #3173: resume before / after the old connection's leave (and every other order) -------------------


def _resume_steps(svc: TelemetryService, sig1: ReferenceGuard, sig2: ReferenceGuard):
    return {
        "old_left": lambda: svc.participant_left(ROOM, ALICE, sig1, send_event=False, reason=DR.SIGNAL_CLOSE),
        "resumed": lambda: svc.participant_resumed(ROOM, ALICE),
        "new_joined": lambda: svc.participant_joined(ROOM, ALICE, sig2, send_event=False),
    }


# Includes both orders of PR #3173: resumed-old_left-new_joined and old_left-resumed-new_joined.
@pytest.mark.parametrize("order", list(itertools.permutations(("old_left", "resumed", "new_joined"))), ids="-".join)
async def test_resume_orders_pr3173(env: Env, order):
    svc, sig2 = env.svc, ReferenceGuard("signal-2")
    session, sig1 = start_session(svc)
    steps = _resume_steps(svc, sig1, sig2)
    for name in order:
        steps[name]()
        await env.advance(REAP + INTERVAL)  # each step lands after a full reap delay
    worker = env.worker()
    assert worker is not None and not worker.closed and worker.ref_count == 2
    svc.track_published(ROOM, ALICE, AUDIO)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    await env.advance(REAP + INTERVAL)
    svc.participant_left(ROOM, ALICE, sig2, send_event=False)  # the new connection's close lands last
    await svc.drain()
    assert env.notifier.names == ["participant_joined", "track_published", "participant_left"]
    assert_well_formed(env.notifier.events, env.clock)
    assert worker.closed and env.worker() is worker


async def test_session_leaves_before_old_connection_stop(env: Env):
    """PR #3173's open case: the old connection's stop arrives after the real departure."""
    svc = env.svc
    session, sig1 = start_session(svc)
    svc.participant_resumed(ROOM, ALICE)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    await env.advance(REAP * 2)
    svc.participant_left(ROOM, ALICE, sig1, send_event=False)
    await env.advance(REAP + INTERVAL)
    assert env.notifier.names == ["participant_joined", "participant_left"]
    assert env.worker() is None


async def test_late_resume_after_departure_adds_no_webhook(env: Env):
    """A resume racing the real departure (the node refuses it, but its telemetry may already be queued):
    the worker it creates inherits `left_sent`, so the new connection's close and the reaper add nothing."""
    svc, sig2 = env.svc, ReferenceGuard("signal-2")
    session, sig1 = start_session(svc)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    svc.participant_left(ROOM, ALICE, sig1, send_event=False)
    await env.advance(INTERVAL)
    svc.participant_resumed(ROOM, ALICE)
    svc.participant_joined(ROOM, ALICE, sig2, send_event=False)
    svc.participant_active(ROOM, ALICE, sig2)
    await env.advance(REAP * 2)
    svc.participant_left(ROOM, ALICE, sig2, send_event=False)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)  # spent guard: ignored
    await env.advance(REAP + INTERVAL)
    assert env.notifier.names == ["participant_joined", "participant_left"]
    assert env.worker() is None
    assert_well_formed(env.notifier.events, env.clock)


# --- reaper ------------------------------------------------------------------------------------------------------


async def test_closed_worker_reaped_only_after_delay(env: Env):
    session = ReferenceGuard()
    svc = env.svc
    svc.participant_joined(ROOM, ALICE, session, send_event=True)
    svc.participant_active(ROOM, ALICE, session)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    await svc.drain()
    worker, closed_at = env.worker(), env.clock.t
    assert worker.closed and worker.closed_at == closed_at
    await svc.tick(closed_at + REAP - 1)
    assert env.worker() is worker
    svc.track_unpublished(ROOM, ALICE, VIDEO)  # late event still finds details within the delay
    await svc.tick(closed_at + REAP)
    assert env.worker() is None
    assert env.notifier.names == ["participant_joined", "participant_left", "track_unpublished"]


async def test_replacement_worker_survives_reaping_of_predecessor(env: Env):
    sig1, sig2 = ReferenceGuard("signal-1"), ReferenceGuard("signal-2")
    svc = env.svc
    svc.participant_joined(ROOM, ALICE, sig1, send_event=False)
    svc.participant_left(ROOM, ALICE, sig1, send_event=False)
    await svc.drain()
    old = env.worker()
    assert old.closed
    t0 = env.clock.t
    env.clock.t += 100
    svc.participant_joined(ROOM, ALICE, sig2, send_event=False)
    await svc.drain()
    new = env.worker()
    assert new is not old and not new.closed and new.ref_count == 1
    old.on_upstream(VIDEO.sid, packets=3)  # a media path still holding the predecessor is flushed until reaped
    new.on_downstream(AUDIO.sid, packets=7)
    records = await svc.tick(t0 + REAP)  # predecessor's delay is over: it goes, its replacement stays
    assert sorted(r.packets for r in records) == [3, 7]
    assert env.worker() is new and WorkerKey.of(ROOM, ALICE.sid) in svc.workers
    await svc.tick(t0 + REAP * 10)
    assert env.worker() is new
    assert env.notifier.names == []


async def test_resume_creates_worker_without_reference_and_carries_connected(env: Env):
    session, sig1 = ReferenceGuard("session"), ReferenceGuard("signal-1")
    svc = env.svc
    svc.participant_joined(ROOM, ALICE, sig1, send_event=False)
    svc.participant_active(ROOM, ALICE, sig1)
    svc.participant_left(ROOM, ALICE, sig1, send_event=False)  # closes: the only holder let go
    svc.participant_resumed(ROOM, ALICE)
    await svc.drain()
    resumed = env.worker()
    assert not resumed.closed and resumed.ref_count == 0 and resumed.connected  # carried, no reference taken
    svc.participant_joined(ROOM, ALICE, session, send_event=False)
    await env.advance(REAP * 3)
    assert env.worker() is resumed and resumed.ref_count == 1  # referenced orphans never expire
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    await svc.drain()
    assert env.notifier.names == ["participant_joined", "participant_left"]


async def test_unreferenced_resume_worker_is_eventually_reaped(env: Env):
    env.svc.participant_resumed(ROOM, ALICE)
    await env.svc.drain()
    assert env.worker().ref_count == 0
    await env.advance(REAP)
    assert env.worker().closed
    await env.advance(REAP)
    assert env.worker() is None and env.notifier.names == []


# --- misuse ------------------------------------------------------------------------------------------------------


async def test_double_release_and_double_activate(env: Env):
    session, sig1 = ReferenceGuard("session"), ReferenceGuard("signal-1")
    svc = env.svc
    svc.participant_joined(ROOM, ALICE, session, send_event=True)
    svc.participant_joined(ROOM, ALICE, session, send_event=False)  # double activate
    svc.participant_active(ROOM, ALICE, session)  # a third activation of the same guard
    svc.participant_joined(ROOM, ALICE, sig1, send_event=False)
    await svc.drain()
    worker = env.worker()
    assert worker.ref_count == 2
    svc.participant_left(ROOM, ALICE, sig1, send_event=False)
    svc.participant_left(ROOM, ALICE, sig1, send_event=False)  # double release: no extra decrement
    await svc.drain()
    assert worker.ref_count == 1 and not worker.closed
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    await svc.drain()
    assert worker.ref_count == 0 and worker.closed
    assert env.notifier.names == ["participant_joined", "participant_left"]
    assert env.sink.types.count("PARTICIPANT_LEFT") == 1


async def test_released_guard_never_resurrects_worker_lk4860(env: Env):
    """Active overtaken by Left: the late Active must not recreate a worker nor send participant_joined."""
    session = ReferenceGuard("session")
    svc = env.svc
    svc.participant_joined(ROOM, ALICE, session, send_event=True)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CONNECTION_TIMEOUT)
    svc.participant_active(ROOM, ALICE, session)
    svc.participant_joined(ROOM, ALICE, session, send_event=False)
    await svc.drain()
    worker = env.worker()
    assert worker.closed and worker.ref_count == 0 and len(svc.workers) == 1
    await env.advance(REAP + INTERVAL)
    assert env.worker() is None
    svc.participant_joined(ROOM, ALICE, session, send_event=False)  # even after reaping: nothing is created
    svc.participant_active(ROOM, ALICE, session)
    await svc.drain()
    assert env.worker() is None
    assert env.notifier.names == ["participant_connection_aborted"]


async def test_connection_aborted_when_never_active(env: Env):
    svc = env.svc
    session, sig1 = start_session(svc, active=False)
    svc.participant_left(ROOM, ALICE, sig1, send_event=False)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.JOIN_FAILURE)
    await svc.drain()
    assert env.notifier.names == ["participant_connection_aborted"]
    assert env.notifier.events[0].participant.disconnect_reason == DR.JOIN_FAILURE
    assert "PARTICIPANT_LEFT" not in env.sink.types and "PARTICIPANT_CONNECTION_ABORTED" in env.sink.types


async def test_migration_sends_no_joined_but_left(env: Env):
    session = ReferenceGuard("session")
    svc = env.svc
    svc.participant_active(ROOM, ALICE, session, is_migration=True)
    svc.participant_resumed(ROOM, ALICE)
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    await svc.drain()
    assert env.notifier.names == ["participant_left"]


async def test_room_lifecycle_and_event_snapshot(env: Env):
    session = ReferenceGuard()
    svc = env.svc
    info = models.ParticipantInfo()
    info.CopyFrom(ALICE)
    svc.room_started(ROOM)
    svc.participant_joined(ROOM, info, session, send_event=True)
    svc.participant_active(ROOM, info, session)
    svc.track_published(ROOM, info, VIDEO)
    svc.track_subscribed(ROOM, info, AUDIO)
    svc.track_unsubscribed(ROOM, info, AUDIO)
    svc.track_unpublished(ROOM, info, VIDEO)
    svc.participant_left(ROOM, info, session, send_event=True, reason=DR.ROOM_DELETED)
    info.identity = "mutated-after-call"  # events carry the state at call time
    svc.room_finished(ROOM)
    await svc.drain()
    assert env.notifier.names == ["room_started", "participant_joined", "track_published", "track_unpublished",
                                  "participant_left", "room_finished"]
    assert all(e.participant.identity in ("", "alice") for e in env.notifier.events)
    assert env.sink.types == ["ROOM_CREATED", "PARTICIPANT_JOINED", "PARTICIPANT_ACTIVE", "TRACK_PUBLISHED",
                              "TRACK_SUBSCRIBED", "TRACK_UNSUBSCRIBED", "TRACK_UNPUBLISHED", "PARTICIPANT_LEFT",
                              "ROOM_ENDED"]
    assert_well_formed(env.notifier.events, env.clock)


async def test_twenty_interleaved_resumes_lose_and_duplicate_nothing(env: Env):
    svc, rng = env.svc, random.Random(4)
    people = [models.ParticipantInfo(sid=f"PA_{i:02d}", identity=f"user{i}") for i in range(20)]
    scripts = []
    for p in people:
        s, g1, g2 = ReferenceGuard(), ReferenceGuard(), ReferenceGuard()
        resume = [lambda p=p, g1=g1: svc.participant_left(ROOM, p, g1, False),
                  lambda p=p: svc.participant_resumed(ROOM, p),
                  lambda p=p, g2=g2: svc.participant_joined(ROOM, p, g2, False)]
        rng.shuffle(resume)
        scripts.append([
            lambda p=p, s=s: svc.participant_joined(ROOM, p, s, True),
            lambda p=p, g1=g1: svc.participant_joined(ROOM, p, g1, False),
            lambda p=p, s=s: svc.participant_active(ROOM, p, s),
            *resume,
            lambda p=p, s=s: svc.participant_left(ROOM, p, s, True, DR.CLIENT_INITIATED),
            lambda p=p, g2=g2: svc.participant_left(ROOM, p, g2, False),
        ])
    while any(scripts):  # interleave participants randomly, each one's own steps in order
        script = rng.choice([s for s in scripts if s])
        script.pop(0)()
        if rng.random() < 0.2:
            await env.advance(REAP / 2)
    await svc.drain()
    for p in people:
        mine = [e.event for e in env.notifier.events if e.participant.sid == p.sid]
        assert mine == ["participant_joined", "participant_left"], p.sid
    assert_well_formed(env.notifier.events, env.clock)


# --- sinks -------------------------------------------------------------------------------------------------------


def _metric_points(reader: InMemoryMetricReader) -> dict[str, list]:
    out: dict[str, list] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


async def test_stats_flushed_to_jsonl_and_otel_with_coalescing(tmp_path):
    clock, path, reader = FakeClock(), tmp_path / "analytics.jsonl", InMemoryMetricReader()
    jsonl, otel = JsonLinesSink(path), OTelMetricsSink(MeterProvider(metric_readers=[reader]))
    svc = TelemetryService(RecordingNotifier(), [jsonl, otel], clock=clock, stats_interval=INTERVAL, reap_delay=REAP)
    await svc.start(periodic=False)
    session = ReferenceGuard()
    svc.participant_joined(ROOM, ALICE, session, send_event=True)
    svc.participant_active(ROOM, ALICE, session)
    svc.track_published(ROOM, ALICE, VIDEO)
    await svc.drain()
    w = svc.worker(ROOM, ALICE.sid)
    w.on_upstream(VIDEO.sid, packets=10, bytes=1000, packets_lost=1, nacks=2, plis=1, jitter=3.0, rtt=40, layer=0,
                  score=4.0)
    w.on_upstream(VIDEO.sid, packets=5, bytes=500, packets_lost=2, nacks=1, firs=1, jitter=7.5, rtt=20, layer=2,
                  score=5.0)
    w.on_upstream(VIDEO.sid, packets=1, bytes=100, layer=1, score=3.0)
    w.on_downstream("TR_remote", packets=4, bytes=400, rtt=15)
    clock.t += INTERVAL
    records = await svc.tick()
    assert len(records) == 2
    assert await svc.tick() == []  # nothing new since: empty tracks are not reported
    w.on_upstream(VIDEO.sid, packets=2, bytes=200)
    clock.t += INTERVAL
    await svc.tick()
    svc.participant_left(ROOM, ALICE, session, send_event=True, reason=DR.CLIENT_INITIATED)
    await svc.stop()

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    stats = [x for x in lines if x["record"] == "stats"]
    events = [x["type"] for x in lines if x["record"] == "event"]
    assert events == ["PARTICIPANT_JOINED", "PARTICIPANT_ACTIVE", "TRACK_PUBLISHED", "PARTICIPANT_LEFT"]
    up = [x for x in stats if x["direction"] == "upstream"]
    assert {k: up[0][k] for k in (
        "packets", "bytes", "packets_lost", "nacks", "plis", "firs", "jitter", "rtt", "layer", "kind", "mime",
        "participant_sid", "identity", "room_name", "score", "min_score", "median_score")} == {
        "packets": 16, "bytes": 1600, "packets_lost": 3, "nacks": 3, "plis": 1, "firs": 1, "jitter": 7.5,
        "rtt": 40, "layer": 2, "kind": "video", "mime": "video/VP8", "participant_sid": ALICE.sid,
        "identity": "alice", "room_name": "room1", "score": 4.0, "min_score": 3.0, "median_score": 4.0}
    assert up[0]["end_time"] - up[0]["start_time"] == INTERVAL
    assert [x["packets"] for x in up] == [16, 2]  # the flush reset the counters
    down = [x for x in stats if x["direction"] == "downstream"]
    assert [(x["track_sid"], x["packets"], x["rtt"]) for x in down] == [("TR_remote", 4, 15)]
    assert records[0].to_proto().streams[0].primary_packets == 16

    points = _metric_points(reader)
    by_dir = {dict(p.attributes)["direction"]: p.value for p in points["braid.media.packets"]}
    assert by_dir == {"upstream": 18, "downstream": 4}
    assert sum(p.value for p in points["braid.media.bytes"]) == 2200
    assert sum(p.value for p in points["braid.media.packets_lost"]) == 3
    assert sum(p.value for p in points["braid.media.nacks"]) == 3
    assert sum(p.value for p in points["braid.media.plis"]) == 1
    assert {p.max for p in points["braid.media.rtt"]} == {40, 15}
    assert [p.value for p in points["braid.participants.joined"]] == [1]
    assert [(dict(p.attributes), p.value) for p in points["braid.participants.left"]] == [({"outcome": "left"}, 1)]


async def test_jsonl_sink_is_bounded_and_never_blocks(tmp_path):
    sink = JsonLinesSink(tmp_path / "a.jsonl", max_queue=2)
    svc = TelemetryService(None, [sink], clock=FakeClock())
    for _ in range(3):
        svc.room_started(ROOM)
    await svc.drain()  # consumer not started: handled inline
    assert sink.dropped == 1
    await sink.flush()
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
