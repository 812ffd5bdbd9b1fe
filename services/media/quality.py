"""Connection quality: LiveKit's score (0-100) and levels (EXCELLENT / GOOD / POOR / LOST) per participant.

Each stream a participant sends us (its published tracks, from what we receive) and each stream we send it (its
subscriptions, from its receiver reports) is scored every `UPDATE_INTERVAL` from the window since the last score:
a simplified E-model takes the loss rate (weighted by codec: loss hurts plain Opus more than RED, video most),
and delay from RTT and jitter. Scores fall fast and recover slowly, never drop below POOR while packets flow, and
a stream that stopped while it should flow is LOST. The participant's quality is its worst stream's. Nothing here
runs per packet: it reads the counters the forwarding path keeps anyway.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

if TYPE_CHECKING:
    from .downtrack import DownTrack
    from .forward import UpTrack

UPDATE_INTERVAL = 5.0
NO_REPORT_TOO_LONG = 30.0  # a subscriber that sent no receiver report this long while we stream to it is lost
MAX_SCORE, MIN_SCORE = 100.0, 30.0
EXCELLENT_ABOVE, GOOD_ABOVE, POOR_ABOVE = 80.0, 40.0, 20.0
LOST_SCORE = 20.0
INCREASE, DECREASE = 0.4, 0.8  # recover conservatively, fall quickly
Quality = models.ConnectionQuality
log = logging.getLogger(__name__)


def loss_weight(mime: str, fec: bool) -> float:
    """How much a percent of loss costs: plain Opus falls to GOOD at 2.5 %, POOR at 7.5 %; RED at 5 % / 15 %;
    video at 2 % / 6 %; in-band FEC makes audio 1.5 times more tolerant."""
    mime = mime.lower()
    if mime == "audio/opus":
        return 8.0 / 1.5 if fec else 8.0
    if mime == "audio/red":
        return 4.0 / 1.5 if fec else 4.0
    return 10.0


def to_quality(score: float) -> int:
    if score > EXCELLENT_ABOVE:
        return Quality.EXCELLENT
    if score > GOOD_ABOVE:
        return Quality.GOOD
    if score > POOR_ABOVE:
        return Quality.POOR
    return Quality.LOST


def to_mos(score: float) -> float:
    """The score on the MOS scale (1 … 4.5) that ConnectionQualityInfo.score carries."""
    if score <= 0:
        return 1.0
    if score >= 100:
        return 4.5
    return 1.0 + 0.035 * score + 0.000007 * score * (score - 60.0) * (100.0 - score)


@dataclass
class Window:
    duration: float
    packets: int  # expected in the window
    lost: int
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0


class Scorer:
    """One stream's score, updated once per window."""

    def __init__(self, weight: float, include_rtt: bool, include_jitter: bool):
        self.weight = weight
        self.include_rtt = include_rtt
        self.include_jitter = include_jitter
        self.score = MAX_SCORE
        self.max_pps = 0.0

    def reset(self) -> None:
        """Muted or paused on purpose: nothing to judge, and no penalty carried over."""
        if self.score != LOST_SCORE:
            self.score = MAX_SCORE

    def lost(self) -> None:
        self.score = LOST_SCORE

    def dry(self) -> None:
        """Nothing arrived in a window although the stream should flow."""
        self.score = GOOD_ABOVE

    def update(self, w: Window) -> None:
        if w.packets <= 0:
            self.dry()
            return
        delay = (w.rtt_ms / 2 if self.include_rtt else 0.0) + (w.jitter_ms * 2 if self.include_jitter else 0.0)
        delay_effect = (delay - 120.0) / 10.0 if delay > 160.0 else delay / 40.0
        # Loss weighs less when the packet rate dropped (DTX silence, a static screen): relative to the peak rate.
        pps = w.packets / w.duration if w.duration > 0 else 0.0
        self.max_pps = max(self.max_pps, pps)
        weight = self.weight * (math.sqrt(pps / self.max_pps) if self.max_pps else 1.0)
        loss_effect = max(0, w.lost) * 100.0 / w.packets * weight
        score = max(0.0, MAX_SCORE - delay_effect - loss_effect)
        factor = DECREASE if score < self.score else INCREASE
        self.score = max(MIN_SCORE, factor * score + (1 - factor) * self.score)


class UpstreamScore:
    """What we receive of one published track (loss from sequence gaps, jitter from arrival times)."""

    def __init__(self, up: UpTrack, fec: bool):
        self.up = up
        self.scorer = Scorer(loss_weight(up.mime, fec), include_rtt=False, include_jitter=True)
        self._prior: dict[int, tuple[int, int]] = {}  # layer ssrc → (expected, received) at the last window
        self._last_packet_at = 0.0

    def update(self, now: float, duration: float, paused: bool) -> None:
        up = self.up
        if up.muted or paused:
            self.scorer.reset()
            self._prior.clear()
            return
        expected = lost = 0
        jitter = 0.0
        for layer in up.layers:
            if layer.max_seq < 0:
                continue
            total = layer.cycles + layer.max_seq - layer.base_seq + 1
            prior = self._prior.get(layer.ssrc)
            self._prior[layer.ssrc] = (total, layer.packets)
            self._last_packet_at = max(self._last_packet_at, layer.last_at)
            if prior is None:
                continue  # first seen: this window only gives the baseline
            expected += total - prior[0]
            lost += (total - prior[0]) - (layer.packets - prior[1])
            jitter = max(jitter, layer.jitter * 1000.0 / up.clock_rate)
        if expected > 0:
            self.scorer.update(Window(duration, expected, lost, jitter_ms=jitter))
        elif self._last_packet_at and now - self._last_packet_at > duration:
            self.scorer.lost()  # it was sending and stopped without muting


class DownstreamScore:
    """What one subscriber receives of a track we send it, from its receiver reports."""

    def __init__(self, down: DownTrack, mime: str, fec: bool):
        self.down = down
        self.scorer = Scorer(loss_weight(mime, fec), include_rtt=True, include_jitter=True)
        self._report_prior: tuple[int, int, int] | None = None  # (highest seq, cumulative lost, nacked) last time
        self._sent_prior = 0
        self._streaming_since = 0.0

    def update(self, now: float, duration: float) -> None:
        d = self.down
        if d.paused:
            self.scorer.reset()
            self._streaming_since = 0.0
            return
        sent, self._sent_prior = d.packets - self._sent_prior, d.packets
        if sent <= 0:
            self._streaming_since = 0.0
            return
        if not self._streaming_since:
            self._streaming_since = now
        report = (d.rr_highest, d.rr_lost, d.nacked)
        if d.rr_at <= now - duration or d.rr_at < self._streaming_since:
            if now - max(d.rr_at, self._streaming_since) > NO_REPORT_TOO_LONG:
                self.scorer.lost()  # streaming to it, and it stopped telling us what arrives
            return
        prior, self._report_prior = self._report_prior, report
        if prior is None:
            return  # the first report only gives the baseline
        expected = (report[0] - prior[0]) & 0xFFFFFFFF
        if expected > 0x7FFFFFFF:
            return  # reordered report
        # Retransmissions go on the stream itself, so a report counts a repaired packet as received: what the
        # subscriber asked for again is the loss on its link.
        lost = max(report[1] - prior[1], report[2] - prior[2])
        window = Window(duration, expected, lost, rtt_ms=d.rtt * 1000.0, jitter_ms=d.rr_jitter * 1000.0 / d.clock_rate)
        self.scorer.update(window)
        log.debug("%s -> %s: %s score %.1f", d.up.track_sid, d.ssrc, window, self.scorer.score)


class ParticipantQuality:
    """The scores of one participant's streams, both ways; its quality is the worst of them."""

    def __init__(self) -> None:
        self._up: dict[str, UpstreamScore] = {}
        self._down: dict[DownTrack, DownstreamScore] = {}
        self.score = MAX_SCORE

    def update(self, now: float, duration: float, published: Iterable[tuple[UpTrack, bool, bool]],
               subscribed: Iterable[tuple[DownTrack, str, bool]]) -> float:
        """`published`: (up-track, fec, paused by dynacast); `subscribed`: (down-track, mime, fec)."""
        up_scores, down_scores = {}, {}
        for up, fec, paused in published:
            score = self._up.get(up.track_sid) or UpstreamScore(up, fec)
            score.update(now, duration, paused)
            up_scores[up.track_sid] = score
        for down, mime, fec in subscribed:
            score = self._down.get(down) or DownstreamScore(down, mime, fec)
            score.update(now, duration)
            down_scores[down] = score
        self._up, self._down = up_scores, down_scores
        self.score = min((s.scorer.score for s in (*up_scores.values(), *down_scores.values())), default=MAX_SCORE)
        return self.score


def info(participant_sid: str, score: float) -> rtc_pb.ConnectionQualityInfo:
    return rtc_pb.ConnectionQualityInfo(participant_sid=participant_sid, quality=to_quality(score),
                                        score=to_mos(score))
