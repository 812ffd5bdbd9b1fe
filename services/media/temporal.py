"""Leaving packets out on purpose: fewer temporal layers for a subscriber that asks for fewer frames a second
(track_setting fps, livekit-client's `setVideoFPS`), with numbering that shows no gap for what was left out.

A stream's rate with each number of temporal layers is measured from the pictures it carries (`PictureRates`, one per
stream whatever the number of its subscribers). Leaving upper layers out is always safe, since no picture refers to
a layer above its own; going back up waits for a picture that refers only to the base layer (VP8's layer sync bit)
or a keyframe. VP9 and AV1 SVC streams are thinned in svc.py; VP8 (each simulcast layer with up to three temporal
layers, libwebrtc's default) here, by `Vp8Thinning`.
"""

from __future__ import annotations

import time
import weakref

from .rtp import Vp8Ids

MAX_TEMPORAL = 3  # L1T3 / L3T3: the SDKs' modes have up to three temporal layers
FPS_WINDOW = 1.0
SEQ_HISTORY = 1024  # outgoing numbers remembered for NACKs (the up-track's buffer holds as many packets)
MAX_RESERVED = 64  # numbers not yet arrived that keep their place in the outgoing numbering


class PictureRates:
    """Pictures per second of one stream with temporal layers 0..t, over the last FPS_WINDOW."""

    def __init__(self) -> None:
        self.fps: list[float] = []
        self._pictures = [0] * MAX_TEMPORAL
        self._window_at: float | None = None
        self._last = None

    def count(self, temporal: int, key=None, now: float | None = None) -> None:
        """One picture of layer `temporal`; `key` (its picture id, say) counts it once however many ask."""
        if key is not None:
            if key == self._last:
                return
            self._last = key
        now = time.monotonic() if now is None else now
        if self._window_at is None:
            self._window_at = now
        elif now - self._window_at >= FPS_WINDOW:
            seen = self._pictures
            top = max((t for t, n in enumerate(seen) if n), default=0)
            elapsed = now - self._window_at
            self.fps = [sum(seen[:t + 1]) / elapsed for t in range(top + 1)]
            self._pictures, self._window_at = [0] * MAX_TEMPORAL, now
        self._pictures[min(max(temporal, 0), MAX_TEMPORAL - 1)] += 1

    def layers_for(self, fps: float) -> int:
        """The highest temporal layer needed for at least `fps` pictures a second (every layer: 0 or unknown)."""
        rates = self.fps
        if not fps or not rates:
            return MAX_TEMPORAL - 1
        for t, rate in enumerate(rates):
            if rate >= fps * 0.9:
                return t
        return MAX_TEMPORAL - 1


class SeqMap:
    """Outgoing numbers (sequence numbers, or VP8 picture ids with `bits`=15 or 7) for a stream that leaves some
    out: consecutive over what is sent, each keeping its place when it arrives late, and mapped back for NACKs."""

    __slots__ = ("mask", "wrap", "half", "start", "highest", "next_out", "in_keys", "outs", "out_keys", "ins")

    def __init__(self, size: int = SEQ_HISTORY, bits: int = 16):
        self.mask = size - 1
        self.wrap = (1 << bits) - 1
        self.half = 1 << (bits - 1)
        self.restart(0, 0)

    def restart(self, first: int, next_out: int) -> None:
        """Number from `first` on, the first sent being `next_out`."""
        size = self.mask + 1
        self.start = first
        self.highest = (first - 1) & self.wrap
        self.next_out = next_out & self.wrap
        self.in_keys, self.outs = [-1] * size, [-1] * size
        self.out_keys, self.ins = [-1] * size, [-1] * size

    def _assign(self, seq: int, out: int) -> None:
        i = seq & self.mask
        self.in_keys[i], self.outs[i] = seq, out
        if out >= 0:
            j = out & self.mask
            self.out_keys[j], self.ins[j] = out, seq

    def newer(self, seq: int) -> bool:
        """Whether `seq` is newer than any seen."""
        gap = (seq - self.highest) & self.wrap
        return 0 < gap < self.half

    def _advance(self, seq: int) -> bool:
        """Whether `seq` is newer than any seen; those skipped over keep their place (up to a limit)."""
        if not self.newer(seq):
            return False
        gap = (seq - self.highest) & self.wrap
        if gap <= MAX_RESERVED:
            for step in range(1, gap):
                self._assign((self.highest + step) & self.wrap, self.next_out)
                self.next_out = (self.next_out + 1) & self.wrap
        self.highest = seq
        if (seq - self.start) & self.wrap > self.half // 2:
            self.start = (seq - self.half // 2) & self.wrap  # what is further behind is too late to send
        return True

    def send(self, seq: int) -> int | None:
        """The outgoing number for `seq`, None if it is not to be sent (older than the start, or a late one whose
        place was not kept)."""
        if self._advance(seq):
            out = self.next_out
            self.next_out = (out + 1) & self.wrap
            self._assign(seq, out)
            return out
        return self.sent_as(seq)

    def sent_as(self, seq: int) -> int | None:
        """The number `seq` has (or keeps a place for) without numbering anything new."""
        if (seq - self.start) & self.half:
            return None
        i = seq & self.mask
        return self.outs[i] if self.in_keys[i] == seq and self.outs[i] >= 0 else None

    def reserve(self, count: int) -> int:
        """The first of `count` outgoing numbers taken by nothing that arrived (padding)."""
        first = self.next_out
        self.next_out = (first + count) & self.wrap
        return first

    def drop(self, seq: int) -> None:
        """`seq` is left out: it takes no number (a late one leaves its kept place empty)."""
        if self._advance(seq) or self.in_keys[seq & self.mask] == seq:
            self._assign(seq, -1)

    def original(self, out: int) -> int | None:
        j = out & self.mask
        if self.out_keys[j] != out:
            return None
        seq = self.ins[j]
        return seq if self.outs[seq & self.mask] == out and self.in_keys[seq & self.mask] == seq else None


_rates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rates_for(stream) -> PictureRates:
    """The picture rates of `stream` (an up-track, or one simulcast layer of it)."""
    rates = _rates.get(stream)
    if rates is None:
        rates = _rates[stream] = PictureRates()
    return rates


class Vp8Thinning:
    """One subscriber's temporal layers of one VP8 simulcast layer: which pictures it gets, and their numbers.

    Sequence numbers and picture ids both run on over what is sent (`SeqMap`): libwebrtc's VP8 receiver takes a gap
    in picture ids for lost pictures and holds back those that may refer to them. TL0PICIDX needs nothing: base-layer
    pictures are never left out."""

    def __init__(self, rates: PictureRates):
        self.rates = rates
        self.top = MAX_TEMPORAL - 1  # the highest temporal layer forwarded now
        self.seqs = SeqMap()
        self.pictures: SeqMap | None = None  # made on the first picture id seen (its width: 7 or 15 bits)
        self.first_out = 0  # the first outgoing sequence number numbered here (earlier ones were numbered before)

    def restart(self, seq: int, next_out: int) -> None:
        """Number from packet `seq` on, as `next_out` (a layer switch, or thinning starting mid-stream)."""
        self.seqs.restart(seq, next_out)
        self.first_out = next_out & 0xFFFF
        self.pictures = None

    def decide(self, ids: Vp8Ids | None, keyframe: bool, max_fps: float, pid_off: int) -> bool:
        """Whether the packet is sent; `pid_off`: what the picture ids were moved on by so far (the first one seen
        here continues from there)."""
        if ids is None or ids.temporal < 0 or not ids.pid_mask:
            return True  # no temporal layers (or no picture ids to renumber): the stream goes as it is
        pictures = self.pictures
        if pictures is None:
            pictures = self.pictures = SeqMap(64, 15 if ids.pid_mask == 0x7FFF else 7)
            pictures.restart(ids.picture_id, ids.picture_id + pid_off)
        pid = ids.picture_id
        if pictures.newer(pid):  # a new picture: the layers may change here
            if (self.seqs.next_out - self.first_out) & 0xFFFF > 0x4000:  # older numbers are not resendable anyway
                self.first_out = (self.seqs.next_out - 0x4000) & 0xFFFF
            if ids.begins:
                self.rates.count(ids.temporal, pid)
            wanted = self.rates.layers_for(max_fps)
            if keyframe or wanted < self.top:
                self.top = wanted
            elif wanted > self.top and ids.sync and self.top < ids.temporal <= wanted:
                self.top = ids.temporal
            if ids.temporal > self.top:
                pictures.drop(pid)
                return False
            pictures.send(pid)
            return True
        return ids.temporal <= self.top and pictures.sent_as(pid) is not None

    def picture_id(self, ids: Vp8Ids) -> int | None:
        """The outgoing picture id of a packet `decide` let through (None: it carries none)."""
        if self.pictures is None or ids.temporal < 0 or not ids.pid_mask:
            return None
        return self.pictures.sent_as(ids.picture_id)

    def original_seq(self, out_seq: int) -> int | None:
        """The publisher's number of outgoing `out_seq` if numbered here; None if not sent, or numbered before."""
        return self.seqs.original(out_seq)

    def numbered_before(self, out_seq: int) -> bool:
        return bool((out_seq - self.first_out) & 0x8000)
