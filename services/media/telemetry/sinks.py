"""Pluggable telemetry sinks and the JSON-lines analytics stream.

Sinks are called from the event loop, so `record_*` must return at once: the JSON-lines sink only serialises and
enqueues; a writer task appends batches to the file in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Protocol, Sequence, runtime_checkable

from .events import TelemetryEvent
from .stats import StatsRecord

log = logging.getLogger(__name__)


@runtime_checkable
class TelemetrySink(Protocol):
    """Receives coalesced stats and telemetry events. `record_*` must not block the event loop."""

    def record_stats(self, records: Sequence[StatsRecord]) -> None: ...

    def record_event(self, event: TelemetryEvent) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class JsonLinesSink:
    """Appends one JSON object per line: `{"record": "stats", ...}` or `{"record": "event", ...}`.

    The queue is bounded so a stuck disk cannot eat memory: when full, lines are dropped and counted in `dropped`.
    """

    def __init__(self, path: str | os.PathLike[str], max_queue: int = 10_000, batch_size: int = 512) -> None:
        self.path = os.fspath(path)
        self.batch_size = batch_size
        self.dropped = 0
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=max_queue)
        self._writer: asyncio.Task[None] | None = None

    # --- TelemetrySink ------------------------------------------------------------------------------------------

    def record_stats(self, records: Sequence[StatsRecord]) -> None:
        for r in records:
            self._put({"record": "stats", **r.to_dict()})

    def record_event(self, event: TelemetryEvent) -> None:
        self._put({"record": "event", **event.to_dict()})

    async def start(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._run(), name="telemetry-jsonl-writer")

    async def stop(self) -> None:
        """Write what is queued, then stop the writer."""
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    # --- helpers ------------------------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Wait until every queued line is on disk (writes inline when no writer task is running)."""
        if self._writer is not None and not self._writer.done():
            await self._queue.join()
            return
        while not self._queue.empty():
            await self._write_batch(self._take_batch([]))

    def _put(self, obj: dict) -> None:
        try:
            self._queue.put_nowait(json.dumps(obj, separators=(",", ":"), default=str))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("analytics stream %s is behind; %d lines dropped", self.path, self.dropped)

    def _take_batch(self, lines: list[str]) -> list[str]:
        while len(lines) < self.batch_size and not self._queue.empty():
            lines.append(self._queue.get_nowait())
        return lines

    async def _run(self) -> None:
        while True:
            lines = self._take_batch([await self._queue.get()])
            await self._write_batch(lines)

    async def _write_batch(self, lines: list[str]) -> None:
        try:
            await asyncio.to_thread(self._append, lines)
        except Exception:  # a full disk must not kill telemetry; the lines are lost and logged
            log.exception("writing %d analytics lines to %s failed", len(lines), self.path)
        finally:
            for _ in lines:
                self._queue.task_done()

    def _append(self, lines: list[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
