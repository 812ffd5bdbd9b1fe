"""A subscriber's available bandwidth, as its receiver reports tell it: loss caps the simulcast layer.

Sustained loss on the layer a subscriber gets means its link cannot carry that layer: the cap drops one
layer below it. Once reports have been clean for a while the link is probed before the cap is raised one layer: the
subscriber is sent padding at half the extra rate the next layer needs (`Prober`), then, once a round trip measured
well into that half shows no queue building up, at all of it; only if the round trips and the loss stay clean over
the whole probe does it switch up. Switching up to find out meant a keyframe the link could not carry and a frozen
picture at every try; a failed probe costs some padding and a short queue, and the next one waits twice as long.
Heavy loss on the lowest layer means the link cannot carry the video at all: the stream is paused (the subscriber
is told, as LiveKit's allocator tells it) and tried again after a while, for twice as long each time it fails
again at once (a paused stream sends nothing, so its reports say nothing of the link).
Receiver reports arrive about once a second, so none of this touches the per-packet path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

CONGESTED = 0.10  # fraction of packets lost in a report interval
CLEAN = 0.02
CONGESTED_REPORTS = 2  # consecutive congested reports before stepping down
PROBE_AFTER = 6.0  # seconds of clean reports before stepping up again
TOP = 2
PAUSE_LOSS = 0.25  # the lowest layer losing this much: random loss does not, a link far below the stream does
MAX_PAUSE = 30.0
PAUSE_GRACE = 3.0  # seconds after the cap fell during which loss is the queue draining, not a reason to pause
LOSS_WINDOW = 0.9  # seconds of receiver reports judged at once
PROBE_STAGE = 2.0  # seconds at least that a probe sends half the extra rate, then as long at least all of it
PROBE_SETTLE = 0.5  # a round trip measured this long into a stage tells of its traffic
PROBE_LOSS = 0.05  # loss during a probe that fails it
PROBE_QUEUEING = 0.05  # seconds of round-trip time above the link's recent minimum that fail a probe
PROBE_TIMEOUT = 10.0  # a probe that has not concluded by then fails
MAX_PROBE_AFTER = 60.0
RTT_MEMORY = 60.0  # seconds of round-trip times whose minimum is the link's own, without a queue


@dataclass
class LossAdapter:
    cap: int = TOP
    _congested: int = 0
    _clean_since: float | None = None
    _changed_at: float = 0.0
    _lowered_at: float = -PAUSE_GRACE
    paused: bool = False
    _heavy: int = 0
    _pause_for: float = PROBE_AFTER
    _resumed_at: float | None = None
    _window: tuple[int, int, float] | None = None  # (highest seq, cumulative lost, at) of a report
    probing_since: float | None = None  # a probe for the layer above the cap is running
    _full_since: float | None = None  # it sends all of the extra rate
    _full_proven: bool = False  # a round trip well into that showed no queue
    _probe_after: float = PROBE_AFTER
    _rtts: deque = field(default_factory=lambda: deque(maxlen=256))  # (rtt, at) of the last RTT_MEMORY seconds

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

    def on_rtt(self, rtt: float, now: float) -> bool:
        """Feed a round-trip time from a receiver report; True when it ended a probe (a queue is building up)."""
        rtts = self._rtts
        while rtts and now - rtts[0][1] > RTT_MEMORY:
            rtts.popleft()
        rtts.append((rtt, now))
        since = self.probing_since
        if since is None:
            return False
        if self.queueing() > PROBE_QUEUEING:
            self._probe_failed(now)
            return True
        if self._full_since is None:
            if now - since >= max(PROBE_STAGE, PROBE_SETTLE):
                self._full_since = now
        elif now - self._full_since >= PROBE_SETTLE:
            self._full_proven = True
        return False

    def queueing(self) -> float:
        """Seconds the last round trip took beyond the link's least of the last RTT_MEMORY seconds (0: unknown):
        the queue ahead of the subscriber."""
        rtts = self._rtts
        return rtts[-1][0] - min(r for r, _ in rtts) if rtts else 0.0

    def probe_fraction(self, now: float) -> float:
        """How much of the extra rate the running probe sends now. Without round-trip times from the receiver
        (it sends no LSR), the stages follow the clock alone."""
        if self.probing_since is None:
            return 0.0
        if self._full_since is None and not self._measures_rtt(now) and now - self.probing_since >= PROBE_STAGE:
            self._full_since = now
        return 1.0 if self._full_since is not None else 0.5

    def _measures_rtt(self, now: float) -> bool:
        return bool(self._rtts) and now - self._rtts[-1][1] <= PROBE_TIMEOUT

    def _probe_failed(self, now: float) -> None:
        self.probing_since, self._clean_since, self._changed_at = None, None, now
        self._probe_after = min(MAX_PROBE_AFTER, self._probe_after * 2)

    def _start_probe(self, now: float) -> None:
        self.probing_since, self._full_since, self._full_proven = now, None, False

    def on_report(self, fraction_lost: float, current_quality: int, now: float, lowest: bool = False) -> bool:
        """Feed one receiver report (`lowest`: of the lowest layer there is); True when the cap, `paused` or
        `probing_since` changed."""
        if self.paused:
            return False
        if self.probing_since is not None:
            self.probe_fraction(now)
            if fraction_lost > PROBE_LOSS or now - self.probing_since > PROBE_TIMEOUT:
                self._probe_failed(now)
                return True
            full = self._full_since
            proven = self._full_proven or (not self._measures_rtt(now) and full is not None)
            if full is not None and now - full >= PROBE_STAGE and proven:
                self.probing_since, self._changed_at, self._probe_after = None, now, PROBE_AFTER
                self.cap += 1
                return True
            return False
        if lowest and fraction_lost >= PAUSE_LOSS and now - self._lowered_at >= PAUSE_GRACE:
            self._heavy += 1
            if self._heavy >= CONGESTED_REPORTS:
                self.pause_now(now)
                return True
        else:
            self._heavy = 0
        if fraction_lost >= CONGESTED:
            self._clean_since = None
            self._congested += 1
            if self._congested >= CONGESTED_REPORTS and current_quality > 0 and self.cap >= current_quality:
                self.cap = current_quality - 1
                self._congested = 0
                self._changed_at = self._lowered_at = now
                return True
            return False
        self._congested = 0
        if fraction_lost > CLEAN:
            self._clean_since = None
            return False
        if self._clean_since is None:
            self._clean_since = now
        if self.cap < TOP and now - max(self._clean_since, self._changed_at) >= self._probe_after and (
                self.queueing() <= PROBE_QUEUEING / 2):  # (a queue still draining would overflow at once)
            self._start_probe(now)
            return True
        return False

    def lower_cap(self, quality: int, now: float) -> None:
        """The subscriber's bandwidth estimate has no room for more than `quality` (allocation.py): as after
        congested reports, the cap drops, and a probe must prove the link before it rises again."""
        self.cap, self._changed_at, self._clean_since, self._congested = quality, now, None, 0
        self._lowered_at = now

    def pause_now(self, now: float) -> None:
        """The estimate has no room for this stream at all (a lower-priority one): paused, tried again later."""
        recently = self._resumed_at is not None and now - self._resumed_at < 2 * PROBE_AFTER
        self._pause_for = min(MAX_PAUSE, self._pause_for * 2) if recently else PROBE_AFTER
        self.paused, self._heavy, self._changed_at, self._clean_since = True, 0, now, None
        self.probing_since = None

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
    """Sends padding (a probe of a subscriber's link) in bursts every TICK seconds at `fraction()` of `rate_bps`,
    until its owner stops it. `send_padding(count, size)` sends `count` padding-only packets of `size` bytes, or
    returns False when it cannot now (the padding stays owed)."""

    TICK = 0.02
    PACKET = 255  # the largest padding one RTP packet can say it carries
    MAX_BURST = 40

    def __init__(self, send_padding: Callable[[int, int], bool], rate_bps: float,
                 fraction: Callable[[], float] = lambda: 1.0):
        self.send_padding = send_padding
        self.rate_bps = rate_bps
        self.fraction = fraction
        self._owed = 0.0  # bytes due and not yet sent
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self._owed += self.rate_bps / 8 * self.TICK * self.fraction()
        count = min(self.MAX_BURST, int(self._owed // self.PACKET))
        if count > 0 and self.send_padding(count, self.PACKET):
            self._owed -= count * self.PACKET
        self._owed = min(self._owed, self.PACKET * self.MAX_BURST)
        self._timer = asyncio.get_running_loop().call_later(self.TICK, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LinkProbes:
    """One subscriber's link carries all its streams: one of them probes it at a time, or each would take the
    others' padding for its own and the link would get all their probes at once. The higher priority goes first:
    a stream of higher priority (`priority`, as the allocator ranks them) that is ready to probe takes the link
    from a lower one, whose probe then ends proving nothing (`yield_probe`) and waits for the next turn."""

    def __init__(self) -> None:
        self.holder: ProbingStream | None = None

    def acquire(self, stream: ProbingStream) -> bool:
        holder = self.holder
        if holder is not None and holder is not stream:
            if holder.priority >= stream.priority:
                return False
            holder.yield_probe()
        self.holder = stream
        return True

    def release(self, stream: ProbingStream) -> None:
        if self.holder is stream:
            self.holder = None


class ProbingStream(Protocol):
    priority: int

    def yield_probe(self) -> None: ...
