"""OpenTelemetry metrics sink.

Attributes are kept low-cardinality (direction, track kind, outcome): per-participant or per-room labels would
explode metric series on a busy node; per-participant detail belongs to the JSON-lines stream.
"""

from __future__ import annotations

from typing import Sequence

from opentelemetry import metrics

from .events import TelemetryEvent
from .stats import StatsRecord

METER_NAME = "braid.media.telemetry"


class OTelMetricsSink:
    """Turns stats records into counters/histograms and participant events into join/leave counters."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None, meter: metrics.Meter | None = None):
        if meter is None:
            provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
            meter = provider.get_meter(METER_NAME)
        self._packets = meter.create_counter("braid.media.packets", unit="{packet}", description="RTP packets")
        self._bytes = meter.create_counter("braid.media.bytes", unit="By", description="RTP payload bytes")
        self._lost = meter.create_counter("braid.media.packets_lost", unit="{packet}", description="Packets lost")
        self._nacks = meter.create_counter("braid.media.nacks", unit="{nack}", description="NACKs")
        self._plis = meter.create_counter("braid.media.plis", unit="{pli}", description="Picture loss indications")
        self._firs = meter.create_counter("braid.media.firs", unit="{fir}", description="Full intra requests")
        self._rtt = meter.create_histogram("braid.media.rtt", unit="ms", description="Max RTT per interval")
        self._jitter = meter.create_histogram("braid.media.jitter", unit="ms", description="Max jitter per interval")
        self._score = meter.create_histogram("braid.media.score", unit="1", description="Connection quality score")
        self._joined = meter.create_counter("braid.participants.joined", unit="{participant}",
                                            description="Participants that joined")
        self._left = meter.create_counter("braid.participants.left", unit="{participant}",
                                          description="Participants that left (outcome=left|aborted)")

    def record_stats(self, records: Sequence[StatsRecord]) -> None:
        for r in records:
            attrs = {"direction": r.direction.value, "kind": r.kind or "unknown"}
            self._packets.add(r.packets, attrs)
            self._bytes.add(r.bytes, attrs)
            self._lost.add(r.packets_lost, attrs)
            self._nacks.add(r.nacks, attrs)
            self._plis.add(r.plis, attrs)
            self._firs.add(r.firs, attrs)
            if r.rtt:
                self._rtt.record(r.rtt, attrs)
            if r.jitter:
                self._jitter.record(r.jitter, attrs)
            if r.score:
                self._score.record(r.score, attrs)

    def record_event(self, event: TelemetryEvent) -> None:
        if event.type == "PARTICIPANT_JOINED":
            self._joined.add(1)
        elif event.type == "PARTICIPANT_LEFT":
            self._left.add(1, {"outcome": "left"})
        elif event.type == "PARTICIPANT_CONNECTION_ABORTED":
            self._left.add(1, {"outcome": "aborted"})

    async def start(self) -> None:
        """Nothing to start: the MeterProvider's readers own export."""

    async def stop(self) -> None:
        """Nothing to stop: the MeterProvider is owned (and shut down) by whoever created it."""
