"""A subscriber's copy of an up-track (`DownTrack`): its own SSRC, sequence numbers and timestamps in front of the
publisher's payloads, NACK answers and sender reports, and the loss adapter and probes that fit its layer to its
link. The RED variants convert audio to what the subscriber negotiated; svc.py has the SVC one.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from typing import Callable

from . import red, rtcp, rtp
from .allocation import PAUSE, Demand
from .congestion import LinkProbes, LossAdapter, Prober
from .fastpath import DownTrackBase
from .forward import Layer, UpTrack
from .temporal import MAX_TEMPORAL, Vp8Thinning, rates_for

log = logging.getLogger(__name__)

_pack = rtp.HEADER.pack
MAX_RETRANSMIT_PER_NACK = 64  # bounds what one (possibly hostile) NACK packet can make us resend
PADDING_RESENT = bytes(3) + bytes([4])  # what a NACK of a probe's padding gets: its number, with 4 bytes of padding
PROBE_SR_INTERVAL = 0.1
# The point a layer was joined at (older packets are not forwarded) trails the stream: once a packet is HORIZON past
# it, it moves on to LATE_LIMIT behind that packet. Fixed, it stood half the number space behind after 32768
# packets, and every packet from then on looked older than it (a 720p layer's video stopped after three minutes).
HORIZON = 0x4000
LATE_LIMIT = 0x1000  # a packet this late is seconds late: no decoder waits for it


class DownTrack(DownTrackBase):
    """One subscriber's copy of an up-track: SSRC, sequence and timestamp rewriting, NACK answers, SR.

    `write` is the reference for what happens to each packet. With the compiled extension, `fastpath.fan_out` runs
    its steady-state branch in C for down-tracks whose `output` (their transport's fastpath Output) is bound, on
    the fields DownTrackBase keeps in C; tests/test_fastpath.py checks both give the same bytes."""

    def __init__(self, up: UpTrack, send: Callable[[bytes], None], pt: int, ssrc: int | None = None,
                 output=None):
        self.up = up
        self.send = send
        self.output = output
        self.pt = pt
        self.ssrc = ssrc or random.randint(1, 0xFFFFFFFF)
        self.clock_rate = up.clock_rate
        self.video = up.video
        self.vp8 = up.mime == "video/VP8"  # picture ids and TL0PICIDX are renumbered across layer switches
        self.pid_off = self.tl0_off = 0
        self.last_pid = self.last_tl0 = -1  # the last sent, as the subscriber saw them; -1: none yet
        self.requested_quality = 2  # what the subscriber asked for (track_setting quality or size)
        self.priority = 1  # its share of a squeezed link, higher first (allocation.py)
        self.loss = LossAdapter()  # what its link carries, from its receiver reports
        self.prober: Prober | None = None  # padding probing its link for the layer above
        self.link_probes: LinkProbes | None = None  # shared by the subscriber's streams
        # (first, count, boundary) of the padding sent since anchoring: `count` numbers from `first` on, after the
        # publisher's packet `boundary`; pad_boundary (read by the compiled fan-out) is the latest boundary, -1: none
        self.padded: list[tuple[int, int, int]] = []
        self.pad_boundary = -1
        # (first, count) of the padding sent lately, however numbered: a NACK of one gets padding again, since a
        # receiver without picture ids (H264) holds every later frame until the gap in its numbers is filled
        self.padding_sent: collections.deque[tuple[int, int]] = collections.deque(maxlen=16)
        self.send_bps = 0.0
        self.send_rtcp: Callable[[bytes], None] | None = None  # its subscriber connection's RTCP (for probes' SRs)
        self._probe_sr_at = 0.0
        self._rate_mark: tuple[int, float] | None = None
        self.current: Layer | None = None
        self.target: Layer | None = None
        self.paused = False  # nothing is forwarded: the subscriber disabled it, or its link cannot carry it
        self.user_paused = False  # the subscriber's track_setting disabled it
        self.on_stream_state: Callable[[bool], None] | None = None  # told True when congestion pauses it
        self.dd_id = 0  # the subscriber's id for the dependency descriptor (0: not negotiated; see svc.py)
        self.bound = True  # False while the subscriber has not applied the description announcing this stream
        self.followup_keyframe = False  # ask once more shortly after starting, in case the first one was dropped
        self.waiting_keyframe = True
        self.closed = False
        self.seq_off = 0
        self.ts_off = 0
        self.switch_seq = 0
        self.last_seq = random.randint(0, 0x7FFF)
        self.last_ts = random.randint(0, 0x7FFFFFFF)
        self.last_ts_at = 0.0
        self.packets = 0
        self.octets = 0
        self.retransmits = 0
        self.nacks = 0
        self.plis = 0
        self.rtt = 0.0
        self.fraction_lost = 0
        self.rr_highest = self.rr_lost = self.rr_jitter = 0  # the subscriber's last receiver report of it
        self.nacked = 0  # sequence numbers it asked for again (its loss before repair)
        self.rr_at = 0.0

    def write(self, layer: Layer, b0: int, marker: int, seq: int, ts: int, payload: bytes, keyframe: bool) -> None:
        if self.paused or not self.bound:
            return
        if layer is self.current and not self.waiting_keyframe:
            if self._stale(seq):
                return  # older than the point this layer was joined at
        elif layer is self.target and (keyframe or not self.video):
            self._anchor(layer, seq, ts, payload)
        else:
            return  # another layer's packet, or still waiting for a keyframe
        out_seq = (seq + self.seq_off - (self._padded_after(seq) if self.padded else 0)) & 0xFFFF
        out_ts = (ts + self.ts_off) & 0xFFFFFFFF
        newest = (out_seq - self.last_seq) & 0xFFFF < 0x8000
        if self.vp8:
            payload = self._renumber(payload, newest)
        self._emit(_pack(0x80 | (b0 & 0x20), (marker << 7) | self.pt, out_seq, out_ts, self.ssrc), payload, out_seq,
                   out_ts, newest)

    def _stale(self, seq: int) -> bool:
        """Whether publisher packet `seq` of the current layer is older than the join point, which this moves on
        to LATE_LIMIT behind `seq` once it is HORIZON behind (and with it the probes' padding it no longer
        concerns); the compiled fan-out leaves that packet to this Python write."""
        ahead = (seq - self.switch_seq) & 0xFFFF
        if ahead & 0x8000:
            return True
        if ahead > HORIZON:
            self.switch_seq = switch = (seq - LATE_LIMIT) & 0xFFFF
            if self.padded:
                self.padded = [p for p in self.padded if not (p[2] - switch) & 0x8000]
                if not self.padded:
                    self.pad_boundary = -1
        return False

    def _emit(self, header: bytes, payload: bytes, out_seq: int, out_ts: int, newest: bool) -> None:
        """Send one forwarded packet and count it; `newest`: no later one was sent yet."""
        self.send(header + payload)
        self.packets += 1
        self.octets += len(payload)
        if newest:
            self.last_seq = out_seq
            self.last_marker = header[1] >= 0x80
            if out_ts != self.last_ts:
                self.last_ts = out_ts
                self.last_ts_at = time.monotonic()

    def skip(self, layer: Layer, seq: int) -> None:
        """Publisher packet `seq` carried only padding and is not forwarded: its number stays a gap here, which
        the subscriber's NACK fills from the buffer."""

    def _anchor(self, layer: Layer, seq: int, ts: int, payload: bytes) -> None:
        """Continue the outgoing stream from `seq`/`ts` (and a VP8 `payload`'s picture ids) of `layer` (first
        packet, layer switch, or resume)."""
        now = time.monotonic()
        if self.last_ts_at:
            advance = max(1, int((now - self.last_ts_at) * self.clock_rate))
        else:
            advance = 0
        self.seq_off = (self.last_seq + 1 - seq) & 0xFFFF
        self.padded, self.pad_boundary = [], -1
        self.ts_off = (self.last_ts + advance - ts) & 0xFFFFFFFF
        ids = rtp.vp8_ids(payload) if self.vp8 else None
        if ids is not None:
            if ids.pid_mask and self.last_pid >= 0:
                self.pid_off = (self.last_pid + 1 - ids.picture_id) & ids.pid_mask
            if ids.tl0 >= 0 and self.last_tl0 >= 0:
                self.tl0_off = (self.last_tl0 + 1 - ids.tl0) & 0xFF
        if self.video and not self.packets:
            self.followup_keyframe = True
        self.switch_seq = seq
        self.waiting_keyframe = False
        log.debug("%s -> %s: anchored on layer %s at seq %d", self.up.track_sid, self.ssrc, layer.ssrc, seq)
        previous, self.current = self.current, layer
        if previous is not layer:
            self.up.reassign(now)

    def convert(self, payload: bytes) -> bytes:
        """The payload as this subscriber receives it (see the RED down-tracks below)."""
        return payload

    def _renumber(self, payload: bytes, newest: bool) -> bytes:
        """A VP8 payload with this down-track's picture id and TL0PICIDX; `newest`: remember them as the last."""
        ids = rtp.vp8_ids(payload)
        if ids is None:
            return payload
        if newest:
            if ids.pid_mask:
                self.last_pid = (ids.picture_id + self.pid_off) & ids.pid_mask
            if ids.tl0 >= 0:
                self.last_tl0 = (ids.tl0 + self.tl0_off) & 0xFF
        if not (self.pid_off or self.tl0_off):
            return payload
        return rtp.vp8_renumbered(payload, ids, self.pid_off, self.tl0_off)

    def pause(self) -> None:
        self.user_paused = True
        self._stop_probe()
        self.loss.cancel_probe()
        self._gate()

    def bind(self) -> None:
        """The subscriber now knows this stream: start at the next keyframe (earlier packets would be dropped
        by its demuxer, and a decoder that missed the keyframe stalls)."""
        if not self.bound:
            self.bound = True
            if self.video:
                self.waiting_keyframe = True
                self.up.request_keyframe(self.target, force=True)

    def resume(self) -> None:
        self.user_paused = False
        self._gate()

    def _gate(self) -> None:
        paused = self.user_paused or self.loss.paused
        if paused == self.paused:
            return
        self.paused = paused
        if not paused and self.video:
            self.waiting_keyframe = True
            self.up.request_keyframe(self.target)
        self.up.demand_changed()

    def congestion_changed(self) -> None:
        """The loss adapter paused or resumed this stream: forward accordingly and tell the subscriber."""
        self._gate()
        if self.on_stream_state is not None:
            self.on_stream_state(self.loss.paused)

    def tick(self, now: float) -> None:
        mark = self._rate_mark
        if mark is not None and now > mark[1]:
            self.send_bps = (self.octets - mark[0]) * 8 / (now - mark[1])
        self._rate_mark = (self.octets, now)
        if self.loss.resume_due(now):
            self.congestion_changed()

    # --- probing the link before switching up ------------------------------------------------------------

    def send_padding(self, count: int, size: int) -> bool:
        """`count` padding-only packets after the last one sent: they take sequence numbers of their own (the
        receiver counts them, so its reports tell whether the link carried them) and later packets move on.
        Only between frames (False: not now): a receiver assembles a frame from consecutive numbers, and padding
        inside one leaves it unassembled for good, the pictures after it held until a keyframe that libwebrtc asks
        for only after 3 s without one."""
        if not self.packets or self.paused or not self.bound or not self.last_marker:
            return False
        first = self.reserve_seqs(count)
        self.padding_sent.append((first, count))
        padding = bytes(size - 1) + bytes([size])
        for i in range(count):
            self.send(_pack(0xA0, self.pt, (first + i) & 0xFFFF, self.last_ts, self.ssrc) + padding)
        self.last_seq = (first + count - 1) & 0xFFFF
        return True

    def reserve_seqs(self, count: int) -> int:
        """The first of `count` outgoing sequence numbers that follow the last sent and belong to no publisher
        packet; later packets move on past them, while a late one from before keeps the number it had."""
        first = (self.last_seq + 1) & 0xFFFF
        boundary = (self.last_seq - self.seq_off) & 0xFFFF  # the publisher's number of the last packet sent
        self.seq_off = (self.seq_off + count) & 0xFFFF
        self.padded = [*self.padded[-15:], (first, count, boundary)]
        self.pad_boundary = boundary
        return first

    def _padded_after(self, seq: int) -> int:
        """How many padding numbers were taken after publisher packet `seq` was due (a late packet, or a
        retransmission the publisher sent once a probe had begun): they are not its offset's."""
        return sum(count for _, count, boundary in self.padded if (boundary - seq) & 0xFFFF < 0x8000)

    def _probe_send(self, count: int, size: int) -> bool:
        """A probe's padding, and every PROBE_SR_INTERVAL a sender report: the round trip a receiver report gives
        is that of the last SR it got, so frequent ones show a queue building up while it is still short."""
        if not self.send_padding(count, size):
            return False
        now = time.monotonic()
        if self.send_rtcp is not None and now - self._probe_sr_at >= PROBE_SR_INTERVAL:
            self._probe_sr_at = now
            report = self.sender_report(now)
            if report is not None:
                self.send_rtcp(report)
        return True

    def probe_rate(self) -> float:
        """The extra bits per second the next layer up would need (0: there is none)."""
        current = self.current
        above = [layer for layer in self.up.layers if current is not None and layer.quality > current.quality]
        if not above:
            return 0.0
        if above[0].bitrate > current.bitrate:
            return above[0].bitrate - current.bitrate
        return max(2 * self.send_bps, 50_000.0)  # never seen yet: simulcast layers are 2-4 times the one below

    def _stop_probe(self) -> None:
        if self.prober is not None:
            self.prober.stop()
            self.prober = None
        if self.link_probes is not None:
            self.link_probes.release(self)

    def yield_probe(self) -> None:
        """A stream of higher priority probes the subscriber's link now: this probe ends, proving nothing."""
        if self.prober is not None:
            log.info("%s -> %s: probe yields to a stream of higher priority", self.up.track_sid, self.ssrc)
        self.loss.cancel_probe()
        self._stop_probe()

    def _adapted(self, lost: float | None, now: float) -> None:
        """The loss adapter changed its mind: pause, start or end a probe, or move the cap."""
        if self.loss.paused:
            self._stop_probe()
            self.congestion_changed()
            return
        if self.loss.probing_since is not None and self.prober is None:
            rate = self.probe_rate() if self.requested_quality > self.loss.cap else 0.0
            if rate <= 0:
                self.loss.probe_needless(now)
            elif self.link_probes is not None and not self.link_probes.acquire(self):
                self.loss.cancel_probe()  # another of the subscriber's streams probes the link now: later
                return
            else:
                log.info("%s -> %s: probing its link with %.0f kbit/s of padding", self.up.track_sid, self.ssrc,
                         rate / 1000)
                self.prober = Prober(self._probe_send, rate, lambda: self.loss.probe_fraction(time.monotonic()))
                return
        probed = self.prober is not None
        self._stop_probe()
        loss = f"{lost:.0%} lost, " if lost is not None else ""
        log.info("%s -> %s: %s%.0f ms round trip%s: quality cap %d", self.up.track_sid, self.ssrc, loss,
                 self.rtt * 1000, " (probe)" if probed else "", self.loss.cap)
        self.up.reassign()

    # --- the subscriber's bandwidth estimate (allocation.py) -----------------------------------------------

    def demand(self, now: float) -> Demand | None:
        """What this stream's layers cost, up to the one the subscriber asked for (None: it is not being sent, or
        its layers are not separate streams)."""
        current = self.current
        if not self.video or self.paused or not self.bound or current is None or self.waiting_keyframe:
            return None
        layers = [l for l in self.up.active_layers(now) if l.quality <= self.requested_quality or l is current]
        if current not in layers or not all(l.bitrate for l in layers):
            return None
        return Demand(self, self.priority, [l.bitrate for l in layers], [l.quality for l in layers], current.bitrate)

    def fit_to(self, quality: int, now: float) -> None:
        """The estimate has room for `quality` at most (PAUSE: for none of it)."""
        if quality == PAUSE:
            log.info("%s -> %s: paused to fit the subscriber's bandwidth estimate", self.up.track_sid, self.ssrc)
            self._stop_probe()
            self.loss.pause_now(now)
            self.congestion_changed()
        elif self.current is not None and quality < self.quality_now():
            log.info("%s -> %s: quality cap %d to fit the subscriber's bandwidth estimate", self.up.track_sid,
                     self.ssrc, quality)
            self._stop_probe()
            self.loss.lower_cap(quality, now)
            self.up.reassign()

    def on_nack(self, seqs: list[int]) -> None:
        """Resend what the buffer still has; ask the publisher for the rest."""
        layer = self.current
        self.nacks += 1
        self.nacked += len(seqs)
        if layer is None or layer.buffer is None or self.loss.paused:
            return  # (paused for congestion: resends would fill the link the pause is clearing)
        missing = []
        for out_seq in seqs[:MAX_RETRANSMIT_PER_NACK]:
            if any((out_seq - first) & 0xFFFF < count for first, count in self.padding_sent):
                self.send(_pack(0xA0, self.pt, out_seq, self.last_ts, self.ssrc) + PADDING_RESENT)
                continue
            seq = self.original_seq(out_seq)
            if seq is None:
                continue
            packet = layer.buffer.get(seq)
            if packet is None:
                missing.append(seq)
                continue
            header = rtp.parse(packet)
            if header is None:
                continue
            _, _, _, ts, marker, off, _ = header
            body = self.convert(packet[off:])
            if self.vp8:
                body = self._renumber(body, newest=False)
            self.send(self.header(layer, seq, packet[0], self.resent_marker(layer, seq, marker, body), out_seq,
                                  (ts + self.ts_off) & 0xFFFFFFFF) + body)
            self.retransmits += 1
        if missing:
            self.up.nack_upstream(layer, missing)

    def header(self, layer: Layer, seq: int, b0: int, marker: int, out_seq: int, out_ts: int) -> bytes:
        """The header a resent packet (publisher packet `seq` of `layer`) goes out with."""
        return _pack(0x80 | (b0 & 0x20), (marker << 7) | self.pt, out_seq, out_ts, self.ssrc)

    def original_seq(self, out_seq: int) -> int | None:
        """The publisher's sequence number of a packet this subscriber got as `out_seq` (None: not one it got)."""
        offset = self.seq_off
        for first, count, _ in reversed(self.padded):  # each padding moved later packets on by its count
            if not (out_seq - first) & 0x8000:
                if (out_seq - first) & 0xFFFF < count:
                    return None  # padding: nothing to resend
                break
            offset = (offset - count) & 0xFFFF
        seq = (out_seq - offset) & 0xFFFF
        return None if (seq - self.switch_seq) & 0x8000 else seq

    def resent_marker(self, layer: Layer, seq: int, marker: int, payload: bytes) -> int:
        return marker

    def on_keyframe_request(self) -> None:
        self.plis += 1
        self.up.request_keyframe(self.current or self.target)

    def quality_now(self) -> int:
        """The quality (simulcast layer) it gets now; only called once it gets one."""
        return self.current.quality

    def lowest_quality(self) -> int:
        return min(layer.quality for layer in self.up.layers)

    @property
    def max_quality(self) -> int:
        return min(self.requested_quality, self.loss.cap)

    def on_receiver_report(self, block: rtcp.ReportBlock, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.fraction_lost = block.fraction_lost
        self.rr_highest, self.rr_lost, self.rr_jitter = block.highest_seq, block.packets_lost, block.jitter
        self.rr_at = now
        if block.lsr:
            now_ntp = rtcp.ntp_now()
            middle = (now_ntp >> 16) & 0xFFFFFFFF
            rtt = ((middle - block.lsr - block.dlsr) & 0xFFFFFFFF) / 65536
            if rtt < 60:
                self.rtt = rtt
                if self.loss.on_rtt(rtt, now):
                    self._adapted(None, now)
        lost = self.loss.windowed(block.highest_seq, block.packets_lost, now)
        if lost is not None and self.video and self.current is not None and not self.user_paused:
            quality = self.quality_now()
            if self.loss.on_report(lost, quality, now, quality <= self.lowest_quality()):
                self._adapted(lost, now)

    def sender_report(self, now: float) -> bytes | None:
        """An SR for this stream: the publisher's NTP↔RTP mapping when known (keeps lip-sync), else our clock."""
        if not self.packets:
            return None
        layer = self.current
        if layer is not None and layer.sr_at:
            elapsed = now - layer.sr_at
            ntp = layer.sr_ntp + int(elapsed * (1 << 32))
            rtp_ts = layer.sr_rtp + self.ts_off + int(elapsed * self.clock_rate)
        else:
            ntp = rtcp.ntp_now()
            rtp_ts = self.last_ts + int((now - self.last_ts_at) * self.clock_rate) if self.last_ts_at else self.last_ts
        return rtcp.sender_report(self.ssrc, ntp, rtp_ts, self.packets, self.octets)

    def set_max_fps(self, fps: float) -> None:
        """Only VP8 has temporal layers here (Vp8DownTrack; SVC streams: svc.py): other streams go at full rate."""

    def set_max_quality(self, quality: int) -> None:
        if quality != self.requested_quality:
            self.requested_quality = quality
            self.up.reassign()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stop_probe()
            self.up.remove_down(self)


class Vp8DownTrack(DownTrack):
    """A VP8 stream that leaves temporal layers out for a subscriber asking for fewer frames a second
    (temporal.py). While it does, its packets go through this `write` in Python (`python_only` keeps the compiled
    fan-out off it), numbered by its `Vp8Thinning`; back at full rate, the next picture hands it back."""

    def __init__(self, up: UpTrack, send: Callable[[bytes], None], pt: int, ssrc: int | None = None,
                 output=None):
        super().__init__(up, send, pt, ssrc, output)
        self.max_fps = 0.0  # what the subscriber asked for (0: every picture)
        self.thinning: Vp8Thinning | None = None  # numbering what it sends, from the first packet it thinned

    def set_max_fps(self, fps: float) -> None:
        self.max_fps = fps
        if fps:
            self.python_only = True  # the next packet starts thinning

    def write(self, layer: Layer, b0: int, marker: int, seq: int, ts: int, payload: bytes, keyframe: bool) -> None:
        if not self.python_only:
            return super().write(layer, b0, marker, seq, ts, payload, keyframe)
        if self.paused or not self.bound:
            return
        if layer is self.current and not self.waiting_keyframe:
            if self._stale(seq):
                return
            if self.thinning is None and not self._start_thinning(layer, seq):
                return super().write(layer, b0, marker, seq, ts, payload, keyframe)  # a late packet: as before
        elif layer is self.target and keyframe:
            self._anchor(layer, seq, ts, payload)
            if not self.python_only:
                return super().write(layer, b0, marker, seq, ts, payload, keyframe)
        else:
            return
        thinning = self.thinning
        ids = rtp.vp8_ids(payload)
        if not thinning.decide(ids, keyframe, self.max_fps, self.pid_off):
            thinning.seqs.drop(seq)
            return
        out_seq = thinning.seqs.send(seq)
        if out_seq is None:
            return
        out_ts = (ts + self.ts_off) & 0xFFFFFFFF
        newest = out_seq == (thinning.seqs.next_out - 1) & 0xFFFF
        payload = self._renumbered(payload, ids, newest)
        self._emit(_pack(0x80 | (b0 & 0x20), (marker << 7) | self.pt, out_seq, out_ts, self.ssrc), payload, out_seq,
                   out_ts, newest)
        if newest:
            if not self.max_fps and thinning.top == MAX_TEMPORAL - 1 and (ids is None or ids.begins):
                self._hand_back(seq, out_seq, ids)

    def _hand_back(self, seq: int, out_seq: int, ids: rtp.Vp8Ids | None) -> None:
        """Every picture is sent again: from picture-starting packet `seq` on, plain forwarding continues the
        numbering (like a layer switch: packets from before it are not sent)."""
        self.seq_off = (out_seq - seq) & 0xFFFF
        self.padded, self.pad_boundary = [], -1
        if ids is not None and ids.pid_mask:
            self.pid_off = (self.last_pid - ids.picture_id) & ids.pid_mask
        self.switch_seq = seq
        self.python_only, self.thinning = False, None

    def _start_thinning(self, layer: Layer, seq: int) -> bool:
        """Thin from packet `seq` on, numbered as it would have been; False for a packet older than the last sent
        (it goes out as before, and thinning starts with a newer one)."""
        out = (seq + self.seq_off - (self._padded_after(seq) if self.padded else 0)) & 0xFFFF
        if not 0 < (out - self.last_seq) & 0xFFFF < 0x8000:
            return False
        self.thinning = Vp8Thinning(rates_for(layer))
        self.thinning.restart(seq, out)
        return True

    def _anchor(self, layer: Layer, seq: int, ts: int, payload: bytes) -> None:
        super()._anchor(layer, seq, ts, payload)
        if not self.python_only:
            return
        if self.max_fps:
            self.thinning = Vp8Thinning(rates_for(layer))
            self.thinning.restart(seq, self.last_seq + 1)
        else:  # every picture is wanted again: plain forwarding (and the compiled path) from this switch on
            self.python_only, self.thinning = False, None

    def _renumber(self, payload: bytes, newest: bool) -> bytes:
        return self._renumbered(payload, rtp.vp8_ids(payload) if self.thinning is not None else None, newest)

    def _renumbered(self, payload: bytes, ids: rtp.Vp8Ids | None, newest: bool) -> bytes:
        """`_renumber` with the payload's descriptor already read (while thinning, its picture ids are ours)."""
        thinning = self.thinning
        pid = thinning.picture_id(ids) if thinning is not None and ids is not None else None
        if pid is None:
            return super()._renumber(payload, newest)
        if newest:
            self.last_pid = pid
            if ids.tl0 >= 0:
                self.last_tl0 = (ids.tl0 + self.tl0_off) & 0xFF
        return rtp.vp8_renumbered(payload, ids, pid - ids.picture_id, self.tl0_off)

    def reserve_seqs(self, count: int) -> int:
        if self.thinning is None:
            return super().reserve_seqs(count)
        return self.thinning.seqs.reserve(count)

    def original_seq(self, out_seq: int) -> int | None:
        thinning = self.thinning
        if thinning is None or thinning.numbered_before(out_seq):
            return super().original_seq(out_seq)
        return thinning.original_seq(out_seq)


class UnwrappingDownTrack(DownTrack):
    """Sends a RED track as plain Opus: the primary block of each packet."""

    def write(self, layer, b0, marker, seq, ts, payload, keyframe) -> None:
        opus = red.primary(payload)
        if opus:
            super().write(layer, b0, marker, seq, ts, opus, keyframe)

    def convert(self, payload: bytes) -> bytes:
        return red.primary(payload)


class RepayloadingDownTrack(DownTrack):
    """Sends RED to a subscriber whose Opus payload type differs from the publisher's."""

    def __init__(self, up: UpTrack, send: Callable[[bytes], None], pt: int, block_pt: int):
        super().__init__(up, send, pt)
        self.block_pt = block_pt

    def write(self, layer, b0, marker, seq, ts, payload, keyframe) -> None:
        super().write(layer, b0, marker, seq, ts, red.with_block_pt(payload, self.block_pt), keyframe)

    def convert(self, payload: bytes) -> bytes:
        return red.with_block_pt(payload, self.block_pt)
