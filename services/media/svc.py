"""Scalable video (VP9 and AV1 SVC): one RTP stream carries every spatial and temporal layer, so a subscriber's
quality is chosen per packet instead of per stream.

A subscriber gets the spatial layers up to the one its quality cap allows, and the temporal layers its
`track_setting` fps asks for (all of them unless it asks; fewer from the next base-layer picture on). Going down
happens at the next picture; going up waits for a keyframe, since the publisher's upper layers only start from
one (libwebrtc's L3T3_KEY). VP9 names each packet's layers in its payload descriptor; AV1 in the extension header
of the OBUs a packet starts (a packet continuing an OBU belongs to the packet before it). The packets it leaves out
must not look lost to the subscriber, so its sequence numbers run on without them (`SeqMap`), and the last packet
it gets of each picture carries the marker bit, which is where libwebrtc's receiver ends a picture and decodes it.

Where publisher and subscriber both negotiated the dependency descriptor header extension, each packet carries the
publisher's descriptor on to the subscriber: libwebrtc's AV1 receiver cannot assemble frames without it (Chrome
decodes nothing). The descriptor's frame references point only into the layers a subscriber keeps, so it stays true
when upper layers are dropped.
"""

from __future__ import annotations

import weakref
from typing import Callable, NamedTuple

from . import rtp
from .downtrack import DownTrack
from .temporal import MAX_TEMPORAL, PictureRates, SeqMap

MAX_FRAGMENTS = 64  # packets one AV1 OBU may span


class SvcLayer(NamedTuple):
    spatial: int
    temporal: int
    begins: bool  # first packet of this layer's frame
    ends: bool  # last packet of this layer's frame
    keyframe: bool  # begins a picture decodable on its own


def vp9_layer(p: bytes | memoryview) -> SvcLayer | None:
    """The layer indices of a VP9 payload descriptor (RFC 9628), or None when truncated."""
    if not p:
        return None
    b = p[0]
    pos = 1
    if b & 0x80:  # I: picture id, 7 or 15 bits
        if len(p) <= pos:
            return None
        pos += 2 if p[pos] & 0x80 else 1
    spatial = temporal = 0
    if b & 0x20:  # L: layer indices
        if len(p) <= pos:
            return None
        spatial, temporal = (p[pos] >> 1) & 0x07, p[pos] >> 5
    begins = bool(b & 0x08)
    return SvcLayer(spatial, temporal, begins, bool(b & 0x04), begins and not b & 0x40 and spatial == 0)


def _leb128(p: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(p) and shift < 35:
        b = p[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def _av1_obu_layer(p: bytes | memoryview) -> tuple[int, int] | None:
    """(spatial, temporal) id of the first OBU with an extension header among those an AV1 packet starts; (0, 0)
    when none has one (a stream without layers); None when malformed."""
    count = (p[0] >> 4) & 0x03  # W: elements in the packet, the last without a length (0: all with one)
    pos, element = 1, 0
    while pos < len(p):
        element += 1
        if count == 0 or element < count:
            size, pos = _leb128(p, pos)
            if size < 0 or size > len(p) - pos:
                return None
        else:
            size = len(p) - pos
        if size > 0:
            header = p[pos]
            if header & 0x04 and size >= 2 and pos + 1 < len(p):
                return (p[pos + 1] >> 3) & 0x03, p[pos + 1] >> 5
        pos += size
    return 0, 0


def av1_layer(p: bytes | memoryview, seq: int, packet_before: Callable[[int], bytes | None]) -> SvcLayer | None:
    """The layer of an AV1 packet (RTP payload format for AV1, section 4.4); `packet_before(seq)` gives an earlier
    packet's payload, for a packet that continues an OBU."""
    if not p:
        return None
    agg = p[0]
    ends = not agg & 0x40  # Y clear: its last OBU is complete
    if not agg & 0x80:  # Z clear: it starts an OBU
        ids = _av1_obu_layer(p)
        return None if ids is None else SvcLayer(ids[0], ids[1], True, ends, bool(agg & 0x08))
    for back in range(1, MAX_FRAGMENTS):
        before = packet_before((seq - back) & 0xFFFF)
        if not before:
            return None
        if not before[0] & 0x80:
            ids = _av1_obu_layer(before)
            return None if ids is None else SvcLayer(ids[0], ids[1], False, ends, False)
    return None


class LayerReader:
    """The layer (and dependency descriptor) of each packet of one up-track, read once however many of its
    subscribers ask."""

    def __init__(self, up):
        self.up = up
        self.av1 = up.mime == "video/AV1"
        self.key: tuple[object, int] | None = None
        self.ids: SvcLayer | None = None
        self.descriptor_key: tuple[object, int] | None = None
        self.descriptor_value: bytes | None = None
        self.rates = PictureRates()

    def __call__(self, layer, seq: int, payload: bytes) -> SvcLayer | None:
        if self.key != (layer, seq):
            self.key = (layer, seq)
            if self.av1:
                self.ids = av1_layer(payload, seq, lambda s: _payload(layer.buffer.get(s)))
            else:
                self.ids = vp9_layer(payload)
            ids = self.ids
            if ids is not None and ids.begins and ids.spatial == 0:
                self.rates.count(ids.temporal)
        return self.ids

    def descriptor(self, layer, seq: int) -> bytes | None:
        """The dependency descriptor publisher packet `seq` carries, if any."""
        if self.descriptor_key != (layer, seq):
            self.descriptor_key = (layer, seq)
            original = layer.buffer.get(seq)
            self.descriptor_value = rtp.extensions(original).get(self.up.dd_id) if original else None
        return self.descriptor_value


def _payload(packet: bytes | None) -> bytes | None:
    header = rtp.parse(packet) if packet else None
    return packet[header[5]:header[6]] if header is not None else None


_readers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reader_for(up) -> LayerReader:
    reader = _readers.get(up)
    if reader is None:
        reader = _readers[up] = LayerReader(up)
    return reader


class SvcDownTrack(DownTrack):
    """One subscriber's layers of a VP9 or AV1 stream (see the module docstring). Written in Python only: the compiled
    fan-out forwards whole streams."""

    def __init__(self, up, send, pt: int, ssrc: int | None = None):
        super().__init__(up, send, pt, ssrc)
        self.spatial = -1  # the highest spatial layer forwarded now (-1: none yet)
        self.max_fps = 0.0  # what the subscriber asked for (0: every picture)
        self.temporal = MAX_TEMPORAL - 1  # the highest temporal layer forwarded now
        self.seqs = SeqMap()
        self.layer_of = reader_for(up)

    def quality_now(self) -> int:
        return max(self.spatial, 0)

    def lowest_quality(self) -> int:
        return 0

    def set_max_quality(self, quality: int) -> None:
        super().set_max_quality(quality)
        if 0 <= self.spatial < self.max_quality and self.current is not None:
            self.up.request_keyframe(self.current, force=True)  # the layers above start from the next one

    def set_max_fps(self, fps: float) -> None:
        self.max_fps = fps

    def write(self, layer, b0, marker, seq, ts, payload, keyframe) -> None:
        if self.paused or not self.bound:
            return
        ids = self.layer_of(layer, seq, payload)
        if ids is None:
            return
        if layer is not self.current or self.waiting_keyframe:
            if layer is not self.target or not ids.keyframe:
                return
            self._anchor(layer, seq, ts, payload)
            self.seqs.restart(seq, self.last_seq + 1)
            self.spatial = self.max_quality
            self.temporal = self.layer_of.rates.layers_for(self.max_fps)
        elif ids.begins and ids.spatial == 0:  # a new picture: the layers may change here
            if ids.temporal == 0:  # no later picture refers past a base-layer one
                self.temporal = self.layer_of.rates.layers_for(self.max_fps)
            wanted = self.max_quality
            if wanted < self.spatial or (wanted > self.spatial and ids.keyframe):
                self.spatial = wanted
            elif wanted > self.spatial:
                self.up.request_keyframe(layer)  # throttled: asked again at most every half second
        if ids.spatial > self.spatial or ids.temporal > self.temporal:
            self.seqs.drop(seq)
            return
        out_seq = self.seqs.send(seq)
        if out_seq is None:
            return
        out_ts = (ts + self.ts_off) & 0xFFFFFFFF
        marker = marker or (ids.ends and ids.spatial == self.spatial)
        self._emit(self.header(layer, seq, b0, marker, out_seq, out_ts), payload, out_seq, out_ts,
                   out_seq == (self.seqs.next_out - 1) & 0xFFFF)

    def demand(self, now: float):
        return None  # its layers are not separate streams with rates of their own: only its loss steps it down

    def skip(self, layer, seq: int) -> None:
        if layer is self.current:
            self.seqs.drop(seq)  # numbered over what is sent, padding leaves no gap

    def header(self, layer, seq: int, b0: int, marker: int, out_seq: int, out_ts: int) -> bytes:
        """The outgoing header, with the publisher's dependency descriptor when both sides negotiated it."""
        if self.dd_id and self.up.dd_id:
            descriptor = self.layer_of.descriptor(layer, seq)
            if descriptor:
                return rtp.with_extension(b0, marker, self.pt, out_seq, out_ts, self.ssrc, self.dd_id, descriptor)
        return rtp.HEADER.pack(0x80 | (b0 & 0x20), (marker << 7) | self.pt, out_seq, out_ts, self.ssrc)

    def original_seq(self, out_seq: int) -> int | None:
        return self.seqs.original(out_seq)

    def reserve_seqs(self, count: int) -> int:
        return self.seqs.reserve(count)

    def probe_rate(self) -> float:
        # The spatial layer above costs about as much again as all those below it.
        return max(self.send_bps, 50_000.0) if 0 <= self.spatial < 2 else 0.0

    def resent_marker(self, layer, seq: int, marker: int, payload: bytes) -> int:
        ids = self.layer_of(layer, seq, payload)
        return int(marker or (ids is not None and ids.ends and ids.spatial == self.spatial))
