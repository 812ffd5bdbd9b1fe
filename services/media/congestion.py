"""A subscriber's available bandwidth, as its receiver reports tell it: loss caps the simulcast layer.

Sustained loss on the layer a subscriber gets means its link cannot carry that layer: the cap drops one
layer below it. Once reports have been clean for a while the cap is raised again, one layer at a time.
Heavy loss on the lowest layer means the link cannot carry the video at all: the stream is paused (the subscriber
is told, as LiveKit's allocator tells it) and tried again after a while, for twice as long each time it fails
again at once (a paused stream sends nothing, so its reports say nothing of the link).
Receiver reports arrive about once a second, so none of this touches the per-packet path.
"""

from __future__ import annotations

from dataclasses import dataclass

CONGESTED = 0.10  # fraction of packets lost in a report interval
CLEAN = 0.02
CONGESTED_REPORTS = 2  # consecutive congested reports before stepping down
PROBE_AFTER = 6.0  # seconds of clean reports before stepping up again
TOP = 2
PAUSE_LOSS = 0.25  # the lowest layer losing this much: random loss does not, a link far below the stream does
MAX_PAUSE = 30.0
LOSS_WINDOW = 0.9  # seconds of receiver reports judged at once


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

    def on_report(self, fraction_lost: float, current_quality: int, now: float, lowest: bool = False) -> bool:
        """Feed one receiver report (`lowest`: of the lowest layer there is); True when the cap or `paused`
        changed."""
        if self.paused:
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
        if self.cap < TOP and now - max(self._clean_since, self._changed_at) >= PROBE_AFTER:
            self.cap += 1
            self._changed_at = now
            return True
        return False

    def resume_due(self, now: float) -> bool:
        """True once a paused stream has rested long enough to be tried again (it is then no longer paused)."""
        if self.paused and now - self._changed_at >= self._pause_for:
            self.paused, self._changed_at, self._resumed_at = False, now, now
            return True
        return False
