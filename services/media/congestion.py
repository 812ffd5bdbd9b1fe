"""A subscriber's available bandwidth, as its receiver reports tell it: loss caps the simulcast layer.

Sustained loss on the layer a subscriber gets means its link cannot carry that layer: the cap drops one
layer below it. Once reports have been clean for a while the cap is raised again, one layer at a time.
Receiver reports arrive about once a second, so none of this touches the per-packet path.
"""

from __future__ import annotations

from dataclasses import dataclass

CONGESTED = 0.10  # fraction of packets lost in a report interval
CLEAN = 0.02
CONGESTED_REPORTS = 2  # consecutive congested reports before stepping down
PROBE_AFTER = 6.0  # seconds of clean reports before stepping up again
TOP = 2


@dataclass
class LossAdapter:
    cap: int = TOP
    _congested: int = 0
    _clean_since: float | None = None
    _changed_at: float = 0.0

    def on_report(self, fraction_lost: float, current_quality: int, now: float) -> bool:
        """Feed one receiver report; True when the cap changed."""
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
