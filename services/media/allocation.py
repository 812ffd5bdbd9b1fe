"""Fitting a subscriber's video into its bandwidth estimate, by priority.

Audio is never cut here: its rate is taken off the estimate first. Then every video stream, highest priority first,
gets its lowest layer while the budget holds; what remains lifts streams one layer at a time, again by priority.
A stream whose lowest layer no longer fits is paused, except the first: the one the subscriber cares most about
is only ever paused by its own loss (congestion.py), never on an estimate alone. As in LiveKit's allocator,
a priority is a number, higher first (0: unset, which a screen share treats as the highest and a camera as the
lowest); streams of equal priority keep their subscription order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

PAUSE = -1
SCREEN_SHARE_PRIORITY = 255
DEFAULT_PRIORITY = 1


@dataclass
class Demand:
    """One video stream: `rates[i]` is the bits per second of its i-th layer (lowest first) among those it may
    get; `quality[i]` that layer's quality."""

    stream: object
    priority: int
    rates: list[float]
    quality: list[int] = field(default_factory=list)
    current_rate: float = 0.0  # the layer it is sent now


def effective_priority(priority: int, screen_share: bool) -> int:
    if priority:
        return max(1, min(255, priority))
    return SCREEN_SHARE_PRIORITY if screen_share else DEFAULT_PRIORITY


def fit(budget_bps: float, demands: list[Demand]) -> dict[object, int]:
    """The quality each stream fits at (PAUSE: none of its layers fits)."""
    order = sorted(range(len(demands)), key=lambda i: -demands[i].priority)
    level: dict[int, int] = {}
    left = budget_bps
    for rank, i in enumerate(order):
        rates = demands[i].rates
        if not rates:
            continue
        if rates[0] <= left or rank == 0:
            level[i] = 0
            left -= rates[0]
    lifted = True
    while lifted:
        lifted = False
        for i in order:
            if i not in level or level[i] + 1 >= len(demands[i].rates):
                continue
            rates = demands[i].rates
            extra = rates[level[i] + 1] - rates[level[i]]
            if extra <= left:
                level[i] += 1
                left -= extra
                lifted = True
    out: dict[object, int] = {}
    for i, demand in enumerate(demands):
        if not demand.rates:
            continue
        out[demand.stream] = demand.quality[level[i]] if i in level else PAUSE
    return out


HEADROOM = 0.95  # of the estimate, for RTCP, retransmissions and the layers' own swings
DEFICIT_FOR = 1.0  # seconds the streams must exceed the estimate before any is cut: one overuse is not a trend
SETTLE = 1.5  # seconds after a cut before the next: the link's queue drains and the estimate catches up
DEFICIT_RATIO = 1.3  # how far the streams must exceed the budget: a loaded machine's delay noise cut unimpaired
                     # subscribers by 10-30 %, while a squeezed link is exceeded several times over


class Stream(Protocol):
    video: bool
    send_bps: float

    def demand(self, now: float) -> Demand | None: ...

    def fit_to(self, quality: int, now: float) -> None: ...


class LinkAllocator:
    """One subscriber's streams against its estimate: when what they are sent exceeds the estimate well
    (DEFICIT_RATIO) for DEFICIT_FOR, the streams are fitted to it by priority (`fit`) and those over their share step down or pause.
    Raising them again is the probes' work (congestion.py): an estimate never exceeds much what the link has
    delivered, so only padding sent on purpose shows it could carry more."""

    def __init__(self) -> None:
        self._deficit_since: float | None = None
        self._cut_at = 0.0
        self.cuts = 0

    def update(self, estimate_bps: float, congested: bool, streams: list[Stream], now: float) -> None:
        """`congested`: the estimate fell for a queue or loss (an estimate below what is sent says nothing while the
        streams merely vary: a keyframe, a publisher sending less for a while)."""
        if not estimate_bps or not congested:
            self._deficit_since = None
            return
        audio = sum(s.send_bps for s in streams if not s.video)
        demands = [d for d in (s.demand(now) for s in streams if s.video) if d is not None]
        budget = estimate_bps * HEADROOM - audio
        if not demands or sum(d.current_rate for d in demands) <= budget * DEFICIT_RATIO:
            self._deficit_since = None
            return
        if self._deficit_since is None:
            self._deficit_since = now
        if now - self._deficit_since < DEFICIT_FOR or now - self._cut_at < SETTLE:
            return
        log.info("%d kbit/s of video against an estimate of %d kbit/s (%d of audio): fitting by priority",
                 sum(d.current_rate for d in demands) / 1000, estimate_bps / 1000, audio / 1000)
        for stream, quality in fit(budget, demands).items():
            stream.fit_to(quality, now)  # type: ignore[attr-defined]
        self._cut_at, self._deficit_since = now, None
        self.cuts += 1
