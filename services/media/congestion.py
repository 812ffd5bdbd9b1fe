"""A subscriber's available bandwidth, as its receiver reports tell it: loss caps the simulcast layer.

Sustained loss on the layer a subscriber gets means its link cannot carry that layer: the cap drops one
layer below it. Once reports have been clean for a while the link is probed before the cap is raised one layer: the
subscriber is sent padding at half, then all of the extra rate the next layer needs (`Prober`), and only if the
reports over
the probe show neither loss nor a queue building up (the round-trip time growing) does it switch up. Switching up to
find out meant a keyframe the link could not carry and a frozen picture at every try; a failed probe costs only
padding, and the next one waits twice as long.
Heavy loss on the lowest layer means the link cannot carry the video at all: the stream is paused (the subscriber
is told, as LiveKit's allocator tells it) and tried again after a while, for twice as long each time it fails
again at once (a paused stream sends nothing, so its reports say nothing of the link).
Receiver reports arrive about once a second, so none of this touches the per-packet path.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Callable

CONGESTED = 0.10  # fraction of packets lost in a report interval
CLEAN = 0.02
CONGESTED_REPORTS = 2  # consecutive congested reports before stepping down
PROBE_AFTER = 6.0  # seconds of clean reports before stepping up again
TOP = 2
PAUSE_LOSS = 0.25  # the lowest layer losing this much: random loss does not, a link far below the stream does
MAX_PAUSE = 30.0
LOSS_WINDOW = 0.9  # seconds of receiver reports judged at once
PROBE_STAGE = 2.0  # seconds a probe sends half the extra rate, then as long the whole (a link's queue fills slowly)
PROBE_SECONDS = 2 * PROBE_STAGE  # a probe succeeds after this long without loss or queueing
PROBE_LOSS = 0.05  # loss during a probe that fails it
PROBE_QUEUEING = 0.1  # seconds of round-trip time above the link's recent minimum that fail a probe
MAX_PROBE_AFTER = 60.0
MIN_RTT_MEMORY = 10.0  # seconds a minimum round-trip time is remembered as the link's baseline


@dataclass
class LossAdapter:
    cap: int = TOP
    _congested: int = 0
    _clean_since: float | None = None
    _changed_at: float = 0.0
    paused: bool = False
    _heavy: int = 0
    _pause_for: float = PROBE_AFTER
    _resumed_at: float | None = None
    _window: tuple[int, int, float] | None = None  # (highest seq, cumulative lost, at) of a report
    probing_since: float | None = None  # a probe for the layer above the cap is running
    _probe_after: float = PROBE_AFTER
    _min_rtt: tuple[float, float] | None = None  # (rtt, at)

    def windowed(self, highest_seq: int, packets_lost: int, now: float) -> float | None:
        """The fraction lost over the last LOSS_WINDOW or more, from a report's cumulative counters (None until a
        window is complete): receivers also report with every NACK and PLI, and those reports' own fraction
        covers a few milliseconds."""
        prior = self._window
        if prior is not None and now - prior[2] < LOSS_WINDOW:
            return None
        self._window = (highest_seq, packets_lost, now)
        if prior is None:
            return None
        expected = (highest_seq - prior[0]) & 0xFFFFFFFF
        if not 0 < expected < 0x80000000:
            return None
        return min(1.0, max(0.0, (packets_lost - prior[1]) / expected))

    def _queueing(self, rtt: float | None, now: float) -> float:
        """How far `rtt` is above the lowest round-trip time of the last MIN_RTT_MEMORY seconds."""
        if rtt is None:
            return 0.0
        low = self._min_rtt
        if low is None or rtt <= low[0] or now - low[1] > MIN_RTT_MEMORY:
            self._min_rtt = low = (rtt, now)
        return rtt - low[0]

    def on_report(self, fraction_lost: float, current_quality: int, now: float, lowest: bool = False,
                  rtt: float | None = None) -> bool:
        """Feed one receiver report (`lowest`: of the lowest layer there is; `rtt`: the round trip it gave); True
        when the cap, `paused` or `probing_since` changed."""
        if self.paused:
            return False
        queueing = self._queueing(rtt, now)
        if self.probing_since is not None:
            if fraction_lost > PROBE_LOSS or queueing > PROBE_QUEUEING:
                self.probing_since, self._clean_since, self._changed_at = None, None, now
                self._probe_after = min(MAX_PROBE_AFTER, self._probe_after * 2)
                return True
            if now - self.probing_since >= PROBE_SECONDS:
                self.probing_since, self._changed_at, self._probe_after = None, now, PROBE_AFTER
                self.cap += 1
                return True
            return False
        if lowest and fraction_lost >= PAUSE_LOSS:
            self._heavy += 1
            if self._heavy >= CONGESTED_REPORTS:
                recently = self._resumed_at is not None and now - self._resumed_at < 2 * PROBE_AFTER
                self._pause_for = min(MAX_PAUSE, self._pause_for * 2) if recently else PROBE_AFTER
                self.paused, self._heavy, self._changed_at, self._clean_since = True, 0, now, None
                return True
        else:
            self._heavy = 0
        if fraction_lost >= CONGESTED:
            self._clean_since = None
            self._congested += 1
            if self._congested >= CONGESTED_REPORTS and current_quality > 0 and self.cap >= current_quality:
                self.cap = current_quality - 1
                self._congested = 0
                self._changed_at = now
                return True
            return False
        self._congested = 0
        if fraction_lost > CLEAN:
            self._clean_since = None
            return False
        if self._clean_since is None:
            self._clean_since = now
        if self.cap < TOP and now - max(self._clean_since, self._changed_at) >= self._probe_after:
            self.probing_since = now
            return True
        return False

    def cancel_probe(self) -> None:
        """The probe stopped for another reason (the subscriber disabled the track): it proved nothing."""
        self.probing_since = None

    def probe_needless(self, now: float) -> None:
        """End a probe at once and raise the cap (nobody wants more, or there is nothing above to fit)."""
        if self.probing_since is not None:
            self.probing_since, self._changed_at = None, now
            self.cap += 1

    def resume_due(self, now: float) -> bool:
        """True once a paused stream has rested long enough to be tried again (it is then no longer paused)."""
        if self.paused and now - self._changed_at >= self._pause_for:
            self.paused, self._changed_at, self._resumed_at = False, now, now
            return True
        return False


class Prober:
    """Sends padding (a probe of a subscriber's link) in bursts every TICK seconds: half of `rate_bps` for
    PROBE_STAGE seconds, then all of it, until its owner stops it. `send_padding(count, size)` sends `count`
    padding-only packets of `size` bytes."""

    TICK = 0.02
    PACKET = 255  # the largest padding one RTP packet can say it carries
    MAX_BURST = 40

    def __init__(self, send_padding: Callable[[int, int], None], rate_bps: float):
        self.send_padding = send_padding
        self.rate_bps = rate_bps
        self.sent = 0  # bytes
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        self._timer: asyncio.TimerHandle | None = loop.call_soon(self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        elapsed = loop.time() - self._started
        due = self.rate_bps / 8 * (min(elapsed, PROBE_STAGE) / 2 + max(0.0, elapsed - PROBE_STAGE))
        count = min(self.MAX_BURST, math.ceil((due - self.sent) / self.PACKET))
        if count > 0:
            self.send_padding(count, self.PACKET)
            self.sent += count * self.PACKET
        self._timer = loop.call_later(self.TICK, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
