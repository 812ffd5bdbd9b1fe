"""A send-side bandwidth estimate per subscriber, from its transport-wide feedback, in the manner of Google
congestion control (draft-ietf-rmcat-gcc-02, and libwebrtc's trendline filter):

* delay-based: packets sent within 5 ms form a group; the change in one-way delay between consecutive groups,
  accumulated and smoothed, is fitted with a line over the last 20 groups. A rising slope means a queue is
  building up (overuse): the estimate drops to 85 % of what the link delivered. Otherwise it grows, by 8 % a second
  while far from the link's last known capacity and by about a packet per round trip near it, never past 1.5
  times what was delivered;
* loss-based: over 10 % lost, the estimate falls with the loss; under 2 %, it may grow.

The estimate is the lower of the two. The per-packet part (matching, the acked window, packet groups and the
trendline) runs in C where the extension is built (`CompiledArrivalDelay`), the once-per-feedback rate and loss
control in Python; `make bench` prints what it costs per reported packet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from . import twcc
from .fastpath import _fastpath

GROUP_US = 5_000
BURST_US = 5_000
WINDOW = 20
SMOOTHING = 0.9
THRESHOLD_GAIN = 4.0
K_UP, K_DOWN = 0.0087, 0.039
OVERUSE_TIME_MS = 10.0
BETA = 0.85
MIN_BPS, MAX_BPS = 30_000.0, 20_000_000.0
ACKED_WINDOW_US = 500_000
LOSS_HIGH, LOSS_LOW = 0.10, 0.02
LOSS_WINDOW_US = 1_000_000
WARMUP = 2.0  # seconds of feedback whose losses are not the link's: the first packets reach a receiver still keying

NORMAL, OVERUSING, UNDERUSING = "normal", "overusing", "underusing"
STATES = (NORMAL, OVERUSING, UNDERUSING)  # as the compiled estimator numbers them


@dataclass
class _Group:
    first_send: int
    send: int
    arrival: int
    size: int


@dataclass
class Trendline:
    """The overuse detector: delay variation between packet groups → normal, overusing or underusing."""

    threshold: float = 12.5
    _accumulated: float = 0.0
    _smoothed: float = 0.0
    _first_arrival: float | None = None
    _points: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    _deltas: int = 0
    _over_ms: float = -1.0
    _over_count: int = 0
    _previous_trend: float = 0.0
    _last_update_ms: float | None = None
    state: str = NORMAL

    def update(self, delay_ms: float, send_delta_ms: float, arrival_ms: float) -> str:
        self._deltas = min(self._deltas + 1, 1000)
        if self._first_arrival is None:
            self._first_arrival = arrival_ms
        self._accumulated += delay_ms
        self._smoothed = SMOOTHING * self._smoothed + (1 - SMOOTHING) * self._accumulated
        self._points.append((arrival_ms - self._first_arrival, self._smoothed))
        trend = self._previous_trend
        if len(self._points) == WINDOW:
            trend = _slope(self._points)
        self._detect(trend, send_delta_ms, arrival_ms)
        return self.state

    def _detect(self, trend: float, send_delta_ms: float, now_ms: float) -> None:
        modified = min(self._deltas, 60) * trend * THRESHOLD_GAIN
        if modified > self.threshold:
            self._over_ms = send_delta_ms / 2 if self._over_ms < 0 else self._over_ms + send_delta_ms
            self._over_count += 1
            if self._over_ms > OVERUSE_TIME_MS and self._over_count > 1 and trend >= self._previous_trend:
                self._over_ms, self._over_count = 0.0, 0
                self.state = OVERUSING
        elif modified < -self.threshold:
            self._over_ms, self._over_count = -1.0, 0
            self.state = UNDERUSING
        else:
            self._over_ms, self._over_count = -1.0, 0
            self.state = NORMAL
        self._previous_trend = trend
        self._adapt_threshold(modified, now_ms)

    def _adapt_threshold(self, modified: float, now_ms: float) -> None:
        if self._last_update_ms is None:
            self._last_update_ms = now_ms
        if abs(modified) > self.threshold + 15:
            self._last_update_ms = now_ms  # a spike (a route change, a stalled sender) is not the link's noise
            return
        k = K_DOWN if abs(modified) < self.threshold else K_UP
        elapsed = min(now_ms - self._last_update_ms, 100.0)
        self.threshold = min(600.0, max(6.0, self.threshold + k * (abs(modified) - self.threshold) * elapsed))
        self._last_update_ms = now_ms


def _slope(points) -> float:
    n = len(points)
    mean_x = sum(p[0] for p in points) / n
    mean_y = sum(p[1] for p in points) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return num / den if den else 0.0


class ArrivalDelay:
    """The per-packet part of the estimate: the window of what was acked, and the packet groups whose delay change
    feeds the trendline. This is the reference; `CompiledArrivalDelay` does the same in C (fastpath/_twcc.c), as a
    subscriber's client reports every packet it was forwarded. Bounded: at most ACKED_MAX packets acked."""

    ACKED_MAX = 2048

    def __init__(self) -> None:
        self.trendline = Trendline()
        self.state = NORMAL
        self._group: _Group | None = None  # the packet group being received
        self._previous: _Group | None = None  # the last complete one
        self._acked: deque = deque()  # (arrival µs, size) of the last ACKED_WINDOW_US
        self._acked_bytes = 0

    def measure(self, body: bytes, sent: twcc.SentPackets) -> tuple[int, int] | None:
        """Feed what a transport-wide feedback `body` reports arrived of what `sent` numbered; (packets matched,
        packets reported lost), None when malformed."""
        matched = sent.matched(body)
        if matched is None:
            return None
        packets, lost = matched
        self.feed(packets)
        return len(packets), lost

    def feed(self, packets: list[tuple[int, int, int]]) -> None:
        """Packets that arrived, as (send µs, arrival µs, size)."""
        for send, arrival, size in packets:
            self._ack(arrival, size)
            self._group_packet(send, arrival, size)

    def acked_bps(self) -> float:
        acked = self._acked
        if len(acked) < 2:
            return 0.0
        span = (acked[-1][0] - acked[0][0]) & 0xFFFFFFFF
        return self._acked_bytes * 8 * 1_000_000 / max(span, 100_000)

    def snapshot(self) -> dict:
        """Every field, as the compiled one reports its own (the comparison test holds them equal)."""
        t = self.trendline

        def group(g: _Group | None):
            return None if g is None else (g.first_send, g.send, g.arrival, g.size)

        return {"group": group(self._group), "previous": group(self._previous), "acked": len(self._acked),
                "acked_bytes": self._acked_bytes, "acked_bps": self.acked_bps(), "threshold": t.threshold,
                "accumulated": t._accumulated, "smoothed": t._smoothed, "first_arrival": t._first_arrival,
                "previous_trend": t._previous_trend, "deltas": t._deltas, "over_ms": t._over_ms,
                "over_count": t._over_count, "last_update_ms": t._last_update_ms, "points": list(t._points),
                "state": STATES.index(self.state)}

    def _ack(self, arrival: int, size: int) -> None:
        acked = self._acked
        if len(acked) == self.ACKED_MAX:
            self._acked_bytes -= acked.popleft()[1]
        acked.append((arrival, size))
        self._acked_bytes += size
        while acked and (arrival - acked[0][0]) & 0xFFFFFFFF > ACKED_WINDOW_US:
            self._acked_bytes -= acked.popleft()[1]

    def _group_packet(self, send: int, arrival: int, size: int) -> None:
        group = self._group
        if group is None:
            self._group = _Group(send, send, arrival, size)
            return
        since_first = (send - group.first_send) & 0xFFFFFFFF
        if since_first >= 0x80000000:
            return  # sent before this group began: reordered, says nothing about the queue
        arrival_gap = (arrival - group.arrival) & 0xFFFFFFFF
        if arrival_gap >= 0x80000000:
            arrival_gap -= 0x100000000
        in_burst = arrival_gap < BURST_US and (arrival_gap - ((send - group.send) & 0xFFFFFFFF)) < 0
        if since_first <= GROUP_US or in_burst:
            group.send, group.size = send, group.size + size
            group.arrival = arrival if arrival_gap > 0 else group.arrival
            return
        # The group is complete: compare it with the one before, last packet with last packet. A queue grows
        # within a group (a frame's packets sent in a burst leave the bottleneck one by one), so comparing only the
        # packets either side of a boundary would miss it.
        previous, self._previous = self._previous, group
        self._group = _Group(send, send, arrival, size)
        if previous is None:
            return
        send_delta = (group.send - previous.send) & 0xFFFFFFFF
        arrival_delta = (group.arrival - previous.arrival) & 0xFFFFFFFF
        if send_delta >= 0x80000000:
            return
        if arrival_delta >= 0x80000000:
            arrival_delta -= 0x100000000
        self.state = self.trendline.update((arrival_delta - send_delta) / 1000, send_delta / 1000,
                                           group.arrival / 1000)


class CompiledArrivalDelay:
    """ArrivalDelay in C: one call per feedback parses it, looks its packets up in the ring and feeds them."""

    def __init__(self) -> None:
        assert _fastpath is not None
        self._state = bytearray(_fastpath.DELAY_STATE_SIZE)
        self.state = NORMAL
        self._acked_bps = 0.0

    def measure(self, body: bytes, sent: twcc.SentPackets) -> tuple[int, int] | None:
        measured = _fastpath.twcc_feed(body, sent.ring, self._state)
        if measured is None:
            return None
        received, lost, self._acked_bps, state = measured
        self.state = STATES[state]
        return received, lost

    def acked_bps(self) -> float:
        return self._acked_bps

    def snapshot(self) -> dict:
        return _fastpath.delay_snapshot(self._state)


class SendSideBwe:
    """One subscriber's estimate (bits per second), fed each feedback with `on_transport_feedback` (or, with
    packets already matched, `on_feedback`); times wrap at 2³² µs on either clock. An SFU does not choose its send
    rate, it forwards what publishers send: so without overuse the estimate is never below what the link just
    delivered, and it only falls when a queue builds up or packets are lost. `compiled`: the per-packet part in C."""

    def __init__(self, initial_bps: float = 0.0, compiled: bool = False) -> None:
        self.delay: ArrivalDelay | CompiledArrivalDelay = (
            CompiledArrivalDelay() if compiled and _fastpath is not None else ArrivalDelay())
        self.delay_bps = initial_bps  # 0: not yet known (the first acked rate sets it)
        self.loss_bps = MAX_BPS
        self._losses: deque = deque()  # (at µs, received, lost)
        self._last_increase_us: int | None = None
        self._last_decrease_us: int | None = None
        self._capacity_bps: float | None = None  # the delivered rate at the last overuse
        self.rtt_ms = 100.0
        self._first_us: int | None = None
        self._overused_us: int | None = None
        self.measured_for = 0.0  # seconds of feedback so far

    @property
    def state(self) -> str:
        return self.delay.state

    @property
    def estimate(self) -> float:
        """Bits per second the link is judged to carry (0 until feedback has measured it)."""
        if not self.delay_bps:
            return 0.0
        return max(MIN_BPS, min(self.delay_bps, self.loss_bps, MAX_BPS))

    def congested(self, now_us: int, within_us: int = 2_000_000) -> bool:
        """A queue built up lately, or loss holds the estimate down: what the streams are sent may not fit."""
        recent = self._overused_us is not None and now_us - self._overused_us <= within_us
        return recent or self.loss_bps < self.delay_bps

    def acked_bps(self) -> float:
        return self.delay.acked_bps()

    def on_transport_feedback(self, body: bytes, sent: twcc.SentPackets, now_us: int) -> bool:
        """One transport-wide feedback packet's body (after its RTCP header) about what `sent` numbered; False when
        malformed."""
        measured = self.delay.measure(body, sent)
        if measured is None:
            return False
        self._measured(*measured, now_us)
        return True

    def on_feedback(self, packets: list[tuple[int, int, int]], lost: int, now_us: int) -> None:
        """One feedback's packets that arrived, as (send µs, arrival µs, size), and how many it says were lost
        (the Python estimator only)."""
        assert isinstance(self.delay, ArrivalDelay)
        self.delay.feed(packets)
        self._measured(len(packets), lost, now_us)

    def _measured(self, received: int, lost: int, now_us: int) -> None:
        if (received or lost) and self.measured_for >= WARMUP:
            self._loss_update(received, lost, now_us)
        self._rate_update(now_us)
        if self._first_us is None:
            self._first_us = now_us
        self.measured_for = (now_us - self._first_us) / 1_000_000

    def _loss_update(self, received: int, lost: int, now_us: int) -> None:
        losses = self._losses
        losses.append((now_us, received, lost))
        while losses and now_us - losses[0][0] > LOSS_WINDOW_US:
            losses.popleft()
        total_received = sum(r for _, r, _ in losses)
        total_lost = sum(l for _, _, l in losses)
        if total_received + total_lost < 20:
            return
        fraction = total_lost / (total_received + total_lost)
        base = self.loss_bps if self.loss_bps < MAX_BPS else min(self.delay_bps, 1.5 * self.acked_bps() + 10_000)
        if fraction > LOSS_HIGH:
            if self._last_decrease_us is None or now_us - self._last_decrease_us > 300_000 + self.rtt_ms * 1000:
                self.loss_bps = max(MIN_BPS, base * (1 - 0.5 * fraction))
                self._last_decrease_us = now_us
        elif fraction < LOSS_LOW and self.loss_bps < MAX_BPS:
            self.loss_bps = base * 1.08 + 1000
            if self.loss_bps > 2 * max(self.delay_bps, 1.0):
                self.loss_bps = MAX_BPS  # loss no longer limits it: the delay-based estimate does

    def _rate_update(self, now_us: int) -> None:
        acked = self.acked_bps()
        if not acked:
            return
        if not self.delay_bps:
            self.delay_bps = acked * 1.5  # what the link carries so far, and room for what it may carry more
            self._last_increase_us = now_us
            return
        if self.state == OVERUSING:
            if self._last_decrease_us is None or now_us - self._last_decrease_us > self.rtt_ms * 1000:
                decreased = BETA * acked
                if decreased < self.delay_bps:
                    self.delay_bps = max(MIN_BPS, decreased)
                self._capacity_bps = acked
                self._last_decrease_us = self._overused_us = now_us
            self._last_increase_us = now_us
            return
        if self.state == UNDERUSING:
            self._last_increase_us = now_us  # the queue is draining: hold until it is empty
            return
        elapsed = min(1.0, (now_us - (self._last_increase_us or now_us)) / 1_000_000)
        self._last_increase_us = now_us
        before = self.delay_bps
        near_capacity = self._capacity_bps is not None and abs(acked - self._capacity_bps) < 0.3 * self._capacity_bps
        if near_capacity:
            response_s = (self.rtt_ms + 100) / 1000
            self.delay_bps += max(1000.0, 1200 * 8 / response_s) * elapsed
        else:
            if self._capacity_bps is not None and acked > 1.3 * self._capacity_bps:
                self._capacity_bps = None  # the link has grown: search again
            self.delay_bps *= 1.08 ** elapsed
        grown = max(self.delay_bps, acked)
        self.delay_bps = min(grown, max(before, 1.5 * acked + 10_000), MAX_BPS)  # app-limited: hold, not fall


class ReceiveSideBwe:
    """What REMB tells a publisher that sends no transport-wide numbers (aiortc, older clients), so that it still
    sends what its uplink carries: the same estimator, one per video stream, fed as the publisher's packets
    arrive, with their send times read from the RTP timestamps (a frame's packets share one; libwebrtc's
    single-stream receive-side estimator does the same without abs-send-time). One REMB covers all of the
    publisher's video, so their estimates add up. Bounded: at most MAX_STREAMS streams, MAX_PENDING packets each
    between two updates."""

    MAX_STREAMS = 8
    MAX_PENDING = 2_000

    def __init__(self) -> None:
        self._streams: dict[int, _StreamArrivals] = {}

    def on_packet(self, ssrc: int, seq: int, timestamp: int, size: int, arrival_us: int,
                  clock_rate: int = 90_000) -> None:
        stream = self._streams.get(ssrc)
        if stream is None:
            if len(self._streams) >= self.MAX_STREAMS:
                return
            stream = self._streams[ssrc] = _StreamArrivals(clock_rate)
        stream.on_packet(seq, timestamp, size, arrival_us)

    def update(self, now_us: int) -> float:
        """Bits per second all the streams' link is judged to carry, from what arrived since the last update (0:
        not measured yet)."""
        total = 0.0
        for stream in self._streams.values():
            stream.flush(now_us)
            total += stream.bwe.estimate
        return total

    def forget(self, ssrc: int) -> None:
        self._streams.pop(ssrc, None)


class _StreamArrivals:
    def __init__(self, clock_rate: int) -> None:
        self.bwe = SendSideBwe()
        self.clock_rate = clock_rate
        self._pending: list[tuple[int, int, int]] = []
        self._highest: int | None = None  # extended sequence number of the newest packet
        self._flushed_highest = 0
        self._received = 0  # since the last flush
        self._timestamp = 0  # the last timestamp, and its unwrapped value
        self._unwrapped = 0

    def on_packet(self, seq: int, timestamp: int, size: int, arrival_us: int) -> None:
        if self._highest is None:
            self._highest = self._flushed_highest = seq
            self._timestamp = self._unwrapped = timestamp
        else:
            step = (seq - self._highest) & 0xFFFF
            if step and step < 0x8000:
                self._highest += step
            step = (timestamp - self._timestamp) & 0xFFFFFFFF
            self._unwrapped += step - 0x100000000 if step >= 0x80000000 else step
            self._timestamp = timestamp
        self._received += 1
        if len(self._pending) < ReceiveSideBwe.MAX_PENDING:
            send_us = (self._unwrapped * 1_000_000 // self.clock_rate) & 0xFFFFFFFF
            self._pending.append((send_us, arrival_us & 0xFFFFFFFF, size))

    def flush(self, now_us: int) -> None:
        if self._highest is None:
            return
        expected = self._highest - self._flushed_highest
        lost = max(0, expected - self._received) if self._received else 0
        self.bwe.on_feedback(self._pending, lost, now_us)
        self._pending = []
        self._flushed_highest, self._received = self._highest, 0
