"""Telemetry for the media service: per-participant stats workers, telemetry events, webhooks and sinks.

Entry point: `TelemetryService`. Holders of a participant (the media participant session and each signal
connection) pass their own `ReferenceGuard`; see `service.py` for the rules that keep `participant_left` exactly-once.
"""

from .events import TelemetryEvent, WebhookNotifier, make_webhook
from .guard import ReferenceCount, ReferenceGuard
from .otel import OTelMetricsSink
from .service import DEFAULT_REAP_DELAY, DEFAULT_STATS_INTERVAL, TelemetryService
from .sinks import JsonLinesSink, TelemetrySink
from .stats import Direction, StatsRecord, TrackStats
from .worker import StatsWorker, WorkerKey

__all__ = [
    "DEFAULT_REAP_DELAY",
    "DEFAULT_STATS_INTERVAL",
    "Direction",
    "JsonLinesSink",
    "OTelMetricsSink",
    "ReferenceCount",
    "ReferenceGuard",
    "StatsRecord",
    "StatsWorker",
    "TelemetryEvent",
    "TelemetryService",
    "TelemetrySink",
    "TrackStats",
    "WebhookNotifier",
    "WorkerKey",
    "make_webhook",
]
