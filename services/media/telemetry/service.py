"""TelemetryService: the map of stats workers, the ordered event queue, webhooks and the flush/reap timer.

Rules that keep `participant_left` from being lost (see issue 4 and LiveKit PRs #2982, #3173, #3964, #4860):
* every holder (participant session, each signal connection) passes its own `ReferenceGuard`; a worker closes
  only when the last one is released, so a resume's old-connection Left cannot close it;
* a resume creates a worker if there is none (or only a closed one) but takes no reference;
* a new worker always inherits `connected` / `left_sent` from a closed predecessor;
* a spent guard never creates or resurrects a worker, and a second Left on it is ignored;
* a closed worker is reaped after `reap_delay`, and the map entry is removed only if it is still that instance;
* all events go through one FIFO queue consumed by one task, so one participant's events are handled in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from livekit.protocol import analytics, models

from .events import (
    PARTICIPANT_CONNECTION_ABORTED, PARTICIPANT_JOINED, PARTICIPANT_LEFT, ROOM_FINISHED, ROOM_STARTED,
    TRACK_PUBLISHED, TRACK_UNPUBLISHED, TelemetryEvent, WebhookNotifier, make_webhook,
)
from .guard import ReferenceGuard
from .sinks import JsonLinesSink, TelemetrySink
from .stats import StatsRecord
from .worker import StatsWorker, WorkerKey

if TYPE_CHECKING:
    from braid.shared.config import TelemetryConfig

log = logging.getLogger(__name__)

Clock = Callable[[], float]
M = TypeVar("M", models.Room, models.ParticipantInfo, models.TrackInfo)
AET = analytics.AnalyticsEventType

DEFAULT_STATS_INTERVAL = 30.0
DEFAULT_REAP_DELAY = 180.0


def _snapshot(msg: M) -> M:
    """Callers keep mutating their ParticipantInfo/Room; events must carry the state at call time."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    return copy


class TelemetryService:
    """One per media process. Event methods are synchronous and only enqueue; handling happens in order."""

    def __init__(
        self,
        notifier: WebhookNotifier | None = None,
        sinks: Sequence[TelemetrySink] = (),
        *,
        clock: Clock = time.time,
        stats_interval: float = DEFAULT_STATS_INTERVAL,
        reap_delay: float = DEFAULT_REAP_DELAY,
    ) -> None:
        if stats_interval <= 0 or reap_delay < 0:
            raise ValueError("stats_interval must be positive and reap_delay non-negative")
        self.notifier = notifier
        self.sinks = list(sinks)
        self.clock = clock
        self.stats_interval = stats_interval
        self.reap_delay = reap_delay
        self._workers: dict[WorkerKey, StatsWorker] = {}
        # Every unreaped worker, including closed predecessors the map no longer points at: they are still
        # flushed (a media path may hold one) until reaped.
        self._live: list[StatsWorker] = []
        self._queue: asyncio.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, cfg: TelemetryConfig, notifier: WebhookNotifier | None = None, *, clock: Clock = time.time,
                    meter_provider: Any = None) -> TelemetryService:
        """Build from `braid.shared.config.TelemetryConfig` (analytics_path, otel_exporter, intervals)."""
        sinks: list[TelemetrySink] = []
        if cfg.analytics_path:
            sinks.append(JsonLinesSink(cfg.analytics_path))
        if cfg.otel_exporter or meter_provider is not None:
            from .otel import OTelMetricsSink

            sinks.append(OTelMetricsSink(meter_provider))
        return cls(notifier, sinks, clock=clock, stats_interval=cfg.stats_interval,
                   reap_delay=cfg.worker_reap_delay)

    # --- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self, *, periodic: bool = True) -> None:
        """Start sinks, the event consumer and (unless `periodic=False`, for fake-clock tests) the flush timer."""
        for sink in self.sinks:
            await sink.start()
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume(), name="telemetry-events")
        if periodic and self._timer is None:
            self._timer = asyncio.create_task(self._run_timer(), name="telemetry-flush")

    async def stop(self) -> None:
        """Handle queued events, flush the last partial interval, then cancel the tasks and stop the sinks."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        await self.drain()
        self.flush_stats()
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        for sink in self.sinks:
            await sink.stop()

    async def drain(self) -> None:
        """Wait until every event enqueued so far has been handled (inline when the consumer is not running)."""
        if self._consumer is not None and not self._consumer.done():
            await self._queue.join()
            return
        while not self._queue.empty():
            self._run_one(*self._queue.get_nowait())

    flush_events = drain

    async def tick(self, now: float | None = None) -> list[StatsRecord]:
        """One timer period, callable directly with a fake clock: handle queued events, then flush and reap."""
        await self.drain()
        return self.flush_stats(now)

    # --- lookups ------------------------------------------------------------------------------------------------

    @property
    def workers(self) -> Mapping[WorkerKey, StatsWorker]:
        return self._workers

    def worker(self, room: models.Room | str, participant_sid: str) -> StatsWorker | None:
        """The current worker, for the media path to report stats to (cache it; valid once the join is handled)."""
        key = WorkerKey(room, participant_sid) if isinstance(room, str) else WorkerKey.of(room, participant_sid)
        return self._workers.get(key)

    # --- events API (enqueue only) ------------------------------------------------------------------------------

    def participant_joined(self, room: models.Room, participant_info: models.ParticipantInfo,
                           guard: ReferenceGuard, send_event: bool = True) -> None:
        """A holder starts tracking the participant. `send_event` only from the participant session."""
        self._submit(self._on_joined, _snapshot(room), _snapshot(participant_info), guard, send_event)

    def participant_active(self, room: models.Room, participant_info: models.ParticipantInfo,
                           guard: ReferenceGuard, is_migration: bool = False) -> None:
        """The participant became ACTIVE: the `participant_joined` webhook, unless a migration or already sent."""
        self._submit(self._on_active, _snapshot(room), _snapshot(participant_info), guard, is_migration)

    def participant_resumed(self, room: models.Room, participant_info: models.ParticipantInfo) -> None:
        """A resume: make sure a worker exists, take no reference, send no webhook."""
        self._submit(self._on_resumed, _snapshot(room), _snapshot(participant_info))

    def participant_left(self, room: models.Room, participant_info: models.ParticipantInfo,
                         guard: ReferenceGuard, send_event: bool,
                         reason: int = models.DisconnectReason.UNKNOWN_REASON) -> None:
        """A holder lets go. With `send_event` (the session, i.e. the real departure): the final webhook."""
        self._submit(self._on_left, _snapshot(room), _snapshot(participant_info), guard, send_event, reason)

    def track_published(self, room: models.Room, participant: models.ParticipantInfo,
                        track: models.TrackInfo) -> None:
        self._submit(self._on_track, AET.TRACK_PUBLISHED, TRACK_PUBLISHED, _snapshot(room), _snapshot(participant),
                     _snapshot(track))

    def track_unpublished(self, room: models.Room, participant: models.ParticipantInfo,
                          track: models.TrackInfo) -> None:
        self._submit(self._on_track, AET.TRACK_UNPUBLISHED, TRACK_UNPUBLISHED, _snapshot(room),
                     _snapshot(participant), _snapshot(track))

    def track_subscribed(self, room: models.Room, participant: models.ParticipantInfo,
                         track: models.TrackInfo) -> None:
        self._submit(self._on_track, AET.TRACK_SUBSCRIBED, None, _snapshot(room), _snapshot(participant),
                     _snapshot(track))

    def track_unsubscribed(self, room: models.Room, participant: models.ParticipantInfo,
                           track: models.TrackInfo) -> None:
        self._submit(self._on_track, AET.TRACK_UNSUBSCRIBED, None, _snapshot(room), _snapshot(participant),
                     _snapshot(track))

    def room_started(self, room: models.Room) -> None:
        self._submit(self._on_room, AET.ROOM_CREATED, ROOM_STARTED, _snapshot(room))

    def room_finished(self, room: models.Room) -> None:
        """Call after the room's last participant_left: the queue keeps that order."""
        self._submit(self._on_room, AET.ROOM_ENDED, ROOM_FINISHED, _snapshot(room))

    # --- queue --------------------------------------------------------------------------------------------------

    def _submit(self, handler: Callable[..., None], *args: Any) -> None:
        # The timestamp is taken at call time, so queueing delay never reorders or skews event times.
        self._queue.put_nowait((handler, (*args, self.clock())))

    def _run_one(self, handler: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            handler(*args)
        except Exception:  # one bad event must not stop the events behind it
            log.exception("telemetry handler %s failed", getattr(handler, "__name__", handler))

    async def _consume(self) -> None:
        while True:
            handler, args = await self._queue.get()
            try:
                self._run_one(handler, args)
            finally:
                self._queue.task_done()

    async def _run_timer(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            # Through the queue, so reaping is ordered with the events enqueued before it.
            self._submit(lambda now: self.flush_stats(now))

    # --- worker map ---------------------------------------------------------------------------------------------

    def _get_or_create(self, key: WorkerKey, room: models.Room, participant: models.ParticipantInfo,
                       guard: ReferenceGuard | None, now: float) -> StatsWorker | None:
        current = self._workers.get(key)
        if current is not None and not current.closed:
            current.update(room, participant)
            if guard is not None:
                current.acquire(guard)  # no-op when this guard already holds it (double activate)
            return current
        if guard is not None and guard.released:
            # A spent guard never creates or resurrects a worker (LiveKit #4860); hand back the closed one, if any.
            return current
        worker = StatsWorker(key, room, participant, now)
        if current is not None:
            worker.inherit(current)
        if guard is not None and not worker.acquire(guard):
            log.warning("guard %r already holds another worker; %s created without its reference", guard, key)
        self._workers[key] = worker
        self._live.append(worker)
        return worker

    def flush_stats(self, now: float | None = None) -> list[StatsRecord]:
        """Flush every live worker to the sinks and reap closed ones whose delay has passed."""
        now = self.clock() if now is None else now
        records: list[StatsRecord] = []
        survivors: list[StatsWorker] = []
        for worker in self._live:
            records.extend(worker.flush(now))
            if worker.expire_orphan(now, self.reap_delay):
                log.info("closing %r: created by a resume and never referenced", worker)
            if worker.reapable(now, self.reap_delay):
                if self._workers.get(worker.key) is worker:  # a replacement created after close survives
                    del self._workers[worker.key]
                continue
            survivors.append(worker)
        self._live = survivors
        if records:
            for sink in self.sinks:
                try:
                    sink.record_stats(records)
                except Exception:
                    log.exception("sink %r failed to record stats", sink)
        return records

    # --- handlers (run on the queue, in order) ------------------------------------------------------------------

    def _on_joined(self, room: models.Room, p: models.ParticipantInfo, guard: ReferenceGuard, send_event: bool,
                   now: float) -> None:
        self._get_or_create(WorkerKey.of(room, p.sid), room, p, guard, now)
        if send_event:
            self._emit(AET.PARTICIPANT_JOINED, now, room, p)

    def _on_active(self, room: models.Room, p: models.ParticipantInfo, guard: ReferenceGuard, is_migration: bool,
                   now: float) -> None:
        if guard.released:
            log.info("participant %s active after its holder left; ignored", p.sid)  # Active overtaken by Left
            return
        worker = self._get_or_create(WorkerKey.of(room, p.sid), room, p, guard, now)
        if worker is None:
            return
        first = not worker.connected
        worker.set_connected()
        if first and not is_migration and not worker.left_sent:
            self._notify(PARTICIPANT_JOINED, now, room, p)
        self._emit(AET.PARTICIPANT_ACTIVE, now, room, p)

    def _on_resumed(self, room: models.Room, p: models.ParticipantInfo, now: float) -> None:
        self._get_or_create(WorkerKey.of(room, p.sid), room, p, None, now)
        self._emit(AET.PARTICIPANT_RESUMED, now, room, p)

    def _on_left(self, room: models.Room, p: models.ParticipantInfo, guard: ReferenceGuard, send_event: bool,
                 reason: int, now: float) -> None:
        key = WorkerKey.of(room, p.sid)
        if guard.released:
            log.debug("duplicate participant_left for %s from %r ignored", key, guard)
            return
        current = self._workers.get(key)
        owner = guard.owner if isinstance(guard.owner, StatsWorker) else current
        workers = [w for w in (owner, current) if w is not None]
        connected = any(w.connected for w in workers)
        if owner is not None:
            owner.update(room, p)
            if not owner.close(guard, now) and send_event:
                log.debug("%r stays open: other holders still reference it", owner)
        else:
            guard.release()  # spend it, so a late Active/Joined cannot take a reference
        if not send_event:
            return
        if not workers:  # never tracked here: keep a closed tombstone so a repeat cannot emit again
            workers = [self._tombstone(key, room, p, now)]
        if any(w.left_sent for w in workers):
            return
        for w in workers:
            w.left_sent = True
        info = _snapshot(p)
        info.disconnect_reason = reason
        reason_name = models.DisconnectReason.Name(reason)
        if connected:
            self._notify(PARTICIPANT_LEFT, now, room, info)
            self._emit(AET.PARTICIPANT_LEFT, now, room, info, reason=reason_name)
        else:
            self._notify(PARTICIPANT_CONNECTION_ABORTED, now, room, info)
            self._emit(AET.PARTICIPANT_CONNECTION_ABORTED, now, room, info, reason=reason_name)

    def _tombstone(self, key: WorkerKey, room: models.Room, p: models.ParticipantInfo, now: float) -> StatsWorker:
        worker = StatsWorker(key, room, p, now)
        worker.closed_at = now
        self._workers[key] = worker
        self._live.append(worker)
        return worker

    def _on_track(self, event_type: int, webhook_name: str | None, room: models.Room, p: models.ParticipantInfo,
                  track: models.TrackInfo, now: float) -> None:
        # Reported whether or not a worker exists: webhooks never depend on worker lifetime.
        worker = self._workers.get(WorkerKey.of(room, p.sid))
        if worker is not None:
            worker.update(room, p)
            worker.set_track(track)
        if webhook_name is not None:
            self._notify(webhook_name, now, room, p, track)
        self._emit(event_type, now, room, p, track)

    def _on_room(self, event_type: int, webhook_name: str, room: models.Room, now: float) -> None:
        self._notify(webhook_name, now, room)
        self._emit(event_type, now, room)

    # --- outputs ------------------------------------------------------------------------------------------------

    def _notify(self, name: str, now: float, room: models.Room, participant: models.ParticipantInfo | None = None,
                track: models.TrackInfo | None = None) -> None:
        if self.notifier is None:
            return
        try:
            self.notifier.notify(make_webhook(name, now, room, participant, track))
        except Exception:
            log.exception("webhook notifier failed on %s", name)

    def _emit(self, event_type: int, now: float, room: models.Room, participant: models.ParticipantInfo | None = None,
              track: models.TrackInfo | None = None, reason: str = "") -> None:
        event = TelemetryEvent.create(event_type, now, room, participant, track, reason)
        for sink in self.sinks:
            try:
                sink.record_event(event)
            except Exception:
                log.exception("sink %r failed to record %s", sink, event.type)
