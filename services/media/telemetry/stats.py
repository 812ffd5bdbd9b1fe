"""Per-track stats accumulation and the coalesced record a flush produces.

The media forwarding code reports deltas on its hot path, so `TrackStats.add` only adds and compares numbers in
preallocated slots; the coalescing LiveKit does at flush time (sum counters, max RTT and jitter, highest video
layer, score avg/min/median) happens incrementally here and is read out once per interval.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from livekit.protocol import analytics

MAX_SCORE_SAMPLES = 1024  # bounds memory for the median if a caller reports a score far more often than expected


def _u32(v: int) -> int:
    return min(max(int(v), 0), 0xFFFFFFFF)


class Direction(str, Enum):
    UPSTREAM = "upstream"  # media the participant publishes (incoming to the SFU)
    DOWNSTREAM = "downstream"  # media forwarded to the participant (outgoing)

    @property
    def stream_type(self) -> int:
        return analytics.StreamType.UPSTREAM if self is Direction.UPSTREAM else analytics.StreamType.DOWNSTREAM


class TrackStats:
    """Mutable counters for one (track, direction) between two flushes."""

    __slots__ = (
        "packets", "bytes", "packets_lost", "nacks", "plis", "firs",
        "jitter", "rtt", "layer", "score_sum", "score_count", "score_min", "scores",
    )

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.reset()

    def reset(self) -> None:
        self.packets = self.bytes = self.packets_lost = 0
        self.nacks = self.plis = self.firs = 0
        self.jitter = 0.0
        self.rtt = 0
        self.layer = -1
        self.score_sum = 0.0
        self.score_count = 0
        self.score_min = 0.0
        self.scores.clear()

    def add(
        self,
        packets: int,
        bytes_: int,
        packets_lost: int,
        nacks: int,
        plis: int,
        firs: int,
        jitter: float,
        rtt: int,
        layer: int,
        score: float,
    ) -> None:
        self.packets += packets
        self.bytes += bytes_
        self.packets_lost += packets_lost
        self.nacks += nacks
        self.plis += plis
        self.firs += firs
        if jitter > self.jitter:
            self.jitter = jitter
        if rtt > self.rtt:
            self.rtt = rtt
        if layer > self.layer:
            self.layer = layer
        if score > 0:  # 0 means "not measured in this report"
            if self.score_count == 0 or score < self.score_min:
                self.score_min = score
            self.score_sum += score
            self.score_count += 1
            if len(self.scores) < MAX_SCORE_SAMPLES:
                self.scores.append(score)

    @property
    def empty(self) -> bool:
        return not (self.packets or self.bytes or self.packets_lost or self.nacks or self.plis or self.firs
                    or self.score_count)


@dataclass(frozen=True)
class StatsRecord:
    """One track's coalesced stats for one interval, as handed to every sink."""

    room_id: str
    room_name: str
    participant_sid: str
    identity: str
    track_sid: str
    direction: Direction
    kind: str  # "audio", "video", "data" or "" if the track was never announced
    mime: str
    start_time: float
    end_time: float
    packets: int
    bytes: int
    packets_lost: int
    nacks: int
    plis: int
    firs: int
    jitter: float
    rtt: int
    layer: int  # highest video layer seen; -1 when none was reported
    score: float  # average; 0 when none was reported
    min_score: float
    median_score: float

    @classmethod
    def from_stats(cls, stats: TrackStats, **ids: Any) -> StatsRecord:
        n = stats.score_count
        return cls(
            packets=stats.packets, bytes=stats.bytes, packets_lost=stats.packets_lost, nacks=stats.nacks,
            plis=stats.plis, firs=stats.firs, jitter=stats.jitter, rtt=stats.rtt, layer=stats.layer,
            score=stats.score_sum / n if n else 0.0, min_score=stats.score_min if n else 0.0,
            median_score=statistics.median(stats.scores) if stats.scores else 0.0, **ids,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["direction"] = self.direction.value
        return d

    def to_proto(self) -> analytics.AnalyticsStat:
        """The LiveKit analytics message, for sinks that speak the LiveKit analytics protocol."""
        u32 = _u32  # the proto's counters (and jitter) are uint32
        stream = analytics.AnalyticsStream(
            primary_packets=u32(self.packets), primary_bytes=self.bytes, packets_lost=u32(self.packets_lost),
            nacks=u32(self.nacks), plis=u32(self.plis), firs=u32(self.firs), jitter=u32(round(self.jitter)),
            rtt=u32(self.rtt),
        )
        stream.start_time.FromNanoseconds(int(self.start_time * 1e9))
        stream.end_time.FromNanoseconds(int(self.end_time * 1e9))
        if self.layer >= 0:
            stream.video_layers.append(
                analytics.AnalyticsVideoLayer(layer=self.layer, packets=u32(self.packets), bytes=self.bytes)
            )
        stat = analytics.AnalyticsStat(
            kind=self.direction.stream_type, room_id=self.room_id, room_name=self.room_name,
            participant_id=self.participant_sid, track_id=self.track_sid, score=self.score,
            min_score=self.min_score, median_score=self.median_score, mime=self.mime, streams=[stream],
        )
        stat.time_stamp.FromNanoseconds(int(self.end_time * 1e9))
        return stat
