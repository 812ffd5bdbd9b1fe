"""Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01): the wire format
both ways, what a receiver keeps to write it, and what a sender keeps to read it.

Every RTP packet of a transport carries one transport-wide sequence number in a header extension; the receiver
tells the sender, about every 100 ms, when each of them arrived (RTPFB FMT 15). Publishers' browsers run their own
bandwidth estimate on what we send them (`ArrivalRecorder`); for subscribers we number what we send
(`SentPackets`, shared with the compiled send path) and estimate from their feedback (bwe.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import rtp

EXT_TRANSPORT_CC = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
FMT_TWCC = 15
RTPFB = 205
DELTA_TICK_US = 250
REFERENCE_TICK_US = 64_000
MAX_DELTA_US = 0x7F00 * DELTA_TICK_US  # what the large delta form carries, with room for rounding
NOT_RECEIVED, SMALL, LARGE = 0, 1, 2


@dataclass
class Feedback:
    """One parsed feedback packet: `arrivals` holds (transport seq, arrival µs on the receiver's clock) of every
    packet it reports received, in order; `lost` counts those it reports missing."""

    media_ssrc: int
    base_seq: int
    count: int
    fb_count: int
    arrivals: list[tuple[int, int]] = field(default_factory=list)
    lost: int = 0


def build(sender_ssrc: int, media_ssrc: int, fb_count: int, base_seq: int, arrivals: list[int | None]) -> bytes:
    """One feedback packet about the transport sequence numbers base_seq, base_seq + 1, …: `arrivals[i]` is the
    arrival of base_seq + i in µs, or None when it did not arrive. One must have arrived, and each delta from the
    one before must fit the large form (±8.19 s): `ArrivalRecorder.feedback` splits where they do not."""
    first = next((at for at in arrivals if at is not None), None)
    if first is None:
        raise ValueError("a feedback reports at least one arrival")
    reference = first // REFERENCE_TICK_US
    previous = reference * REFERENCE_TICK_US
    symbols: list[int] = []
    deltas = bytearray()
    for at in arrivals:
        if at is None:
            symbols.append(NOT_RECEIVED)
            continue
        ticks = (at - previous) // DELTA_TICK_US
        if 0 <= ticks <= 0xFF:
            symbols.append(SMALL)
            deltas.append(ticks)
        elif -0x8000 <= ticks <= 0x7FFF:
            symbols.append(LARGE)
            deltas += struct.pack("!h", ticks)
        else:
            raise ValueError("arrival delta does not fit a feedback packet")
        previous += ticks * DELTA_TICK_US  # the receiver's sum, so rounding never drifts
    body = struct.pack("!IIHHI", sender_ssrc, media_ssrc, base_seq & 0xFFFF, len(symbols),
                       ((reference & 0xFFFFFF) << 8) | (fb_count & 0xFF)) + _chunks(symbols) + deltas
    padding = -len(body) % 4
    if padding:
        body += bytes(padding - 1) + bytes([padding])
    header = struct.pack("!BBH", 0x80 | (0x20 if padding else 0) | FMT_TWCC, RTPFB, len(body) // 4)
    return header + body


def _chunks(symbols: list[int]) -> bytes:
    out = bytearray()
    i, n = 0, len(symbols)
    while i < n:
        run = 1
        while i + run < n and symbols[i + run] == symbols[i] and run < 0x1FFF:
            run += 1
        ahead = symbols[i:i + 14]
        if run >= 14 or (run >= 7 and (run == n - i or max(ahead) == LARGE)):
            out += struct.pack("!H", (symbols[i] << 13) | run)
            i += run
        elif max(ahead) <= SMALL:
            word = 0x8000
            for k, s in enumerate(ahead):
                word |= s << (13 - k)
            out += struct.pack("!H", word)
            i += 14
        else:
            word = 0xC000
            for k, s in enumerate(symbols[i:i + 7]):
                word |= s << (12 - 2 * k)
            out += struct.pack("!H", word)
            i += 7
    return bytes(out)


def parse(body: bytes) -> Feedback | None:
    """A feedback packet's body after the 4-byte RTCP header (its padding included); None when malformed."""
    if len(body) < 16:
        return None
    sender, media, base, count, ref_word = struct.unpack_from("!IIHHI", body)
    reference = ref_word >> 8
    if reference & 0x800000:
        reference -= 0x1000000
    fb = Feedback(media, base, count, ref_word & 0xFF)
    symbols: list[tuple[int, int]] = []  # (symbol, how many)
    pos, seen, n = 16, 0, len(body)
    while seen < count:
        if pos + 2 > n:
            return None
        (word,) = struct.unpack_from("!H", body, pos)
        pos += 2
        if not word & 0x8000:
            run = min(word & 0x1FFF, count - seen)
            symbols.append(((word >> 13) & 3, run))
            seen += run
        elif not word & 0x4000:
            for k in range(min(14, count - seen)):
                symbols.append(((word >> (13 - k)) & 1, 1))
            seen += min(14, count - seen)
        else:
            for k in range(min(7, count - seen)):
                symbols.append(((word >> (12 - 2 * k)) & 3, 1))
            seen += min(7, count - seen)
    at = reference * REFERENCE_TICK_US
    seq = base
    for symbol, run in symbols:
        if symbol == NOT_RECEIVED or symbol == 3:
            fb.lost += run
            seq += run
            continue
        size = 1 if symbol == SMALL else 2
        if pos + size * run > n:
            return None
        for _ in range(run):
            if size == 1:
                ticks = body[pos]
            else:
                (ticks,) = struct.unpack_from("!h", body, pos)
            pos += size
            at += ticks * DELTA_TICK_US
            fb.arrivals.append((seq & 0xFFFF, at))
            seq += 1
    return fb


def transport_seq(data: bytes, ext_id: int) -> int | None:
    """The transport-wide sequence number of a received RTP packet."""
    found = rtp.extension(data, ext_id)
    if found is None or found[1] < 2:
        return None
    pos = found[0]
    return (data[pos] << 8) | data[pos + 1]


MAX_RTP = 2032  # what the compiled path's slots hold before the SRTP tag


def stamped(packet: bytes, ext_id: int, seq: int) -> bytes | None:
    """`packet` with transport-wide sequence number `seq` added to its header extensions (a new one-byte block
    when it has none); None when its extensions cannot take one more. The compiled send path does the same to the
    same bytes (tests/test_fastpath.py)."""
    b0 = packet[0]
    off = 12 + 4 * (b0 & 0x0F)
    hi, lo = (seq >> 8) & 0xFF, seq & 0xFF
    if off > len(packet):
        return None
    if not b0 & 0x10:
        if len(packet) + 8 > MAX_RTP:
            return None
        return bytes([b0 | 0x10]) + packet[1:off] + bytes((0xBE, 0xDE, 0, 1, (ext_id << 4) | 1, hi, lo, 0)) + \
            packet[off:]
    if off + 4 > len(packet) or len(packet) + 4 > MAX_RTP:
        return None
    profile, words = struct.unpack_from("!HH", packet, off)
    end = off + 4 + 4 * words
    if end > len(packet) or words >= 0xFFFF:
        return None
    if profile == 0xBEDE:
        element = bytes(((ext_id << 4) | 1, hi, lo, 0))
    elif profile & 0xFFF0 == 0x1000:
        element = bytes((ext_id, 2, hi, lo))
    else:
        return None  # a profile we cannot add to
    return packet[:off] + struct.pack("!HH", profile, words + 1) + packet[off + 4:end] + element + packet[end:]


class ArrivalRecorder:
    """What a publisher's transport-wide sequence numbers arrived when, until the next feedback reports them.
    Bounded: a client that jumps its numbers about forgets what it sent before the jump."""

    MAX_PENDING = 2048
    MAX_SPAN = 4096

    def __init__(self, sender_ssrc: int) -> None:
        self.sender_ssrc = sender_ssrc
        self.media_ssrc = 0
        self._pending: dict[int, int] = {}  # unwrapped seq → arrival µs
        self._last: int | None = None  # the highest unwrapped seq seen
        self._reported_to: int | None = None  # the next unwrapped seq a feedback starts at
        self._fb_count = 0
        self._epoch: int | None = None  # arrivals count from the first, so the 24-bit reference time never wraps

    def on_packet(self, seq: int, media_ssrc: int, arrival_us: int) -> None:
        if self._epoch is None:
            self._epoch = arrival_us
        arrival_us -= self._epoch
        last = self._last
        if last is None:
            unwrapped = seq
        else:
            delta = (seq - last) & 0xFFFF
            unwrapped = last + (delta - 0x10000 if delta & 0x8000 else delta)
        if last is not None and abs(unwrapped - last) > self.MAX_SPAN:
            self._pending.clear()
            self._reported_to = None
        if last is None or unwrapped > last or abs(unwrapped - last) > self.MAX_SPAN:
            self._last = unwrapped
        if self._reported_to is not None and unwrapped < self._reported_to:
            return  # later than its feedback went: reporting it would report its neighbours twice
        if len(self._pending) >= self.MAX_PENDING:
            self._pending.pop(min(self._pending))
        self._pending[unwrapped] = arrival_us
        self.media_ssrc = media_ssrc

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def feedback(self) -> list[bytes]:
        """Feedback packets for everything that arrived since the last call (and the gaps between)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return []
        seqs = sorted(pending)
        start = seqs[0]
        if self._reported_to is not None and self._reported_to <= start and start - self._reported_to < 256:
            start = self._reported_to  # report the gap since the last feedback as missing, not forgotten
        self._reported_to = seqs[-1] + 1
        out: list[bytes] = []
        run: list[int | None] = []
        base, previous = start, None
        for unwrapped in range(start, seqs[-1] + 1):
            at = pending.get(unwrapped)
            if at is not None and previous is not None and (abs(at - previous) >= MAX_DELTA_US or len(run) >= 1024):
                out.append(self._packet(base, run))
                run, base = [], unwrapped
            run.append(at)
            if at is not None:
                previous = at
        while run and run[-1] is None:
            run.pop()
        if run:
            out.append(self._packet(base, run))
        return out

    def _packet(self, base: int, run: list[int | None]) -> bytes:
        packet = build(self.sender_ssrc, self.media_ssrc, self._fb_count, base, run)
        self._fb_count = (self._fb_count + 1) & 0xFF
        return packet


class SentPackets:
    """The transport-wide sequence numbers a subscriber transport sent: the next one to use, and when and how big
    each of the last RING was. It lives in one bytearray (`ring`) that the compiled send path writes too, so both
    number one sequence: bytes 0-3 the next number, then RING entries of (send µs mod 2³², size, seq) each."""

    RING = 4096
    ENTRY = struct.Struct("=IHH")
    HEADER = struct.Struct("=I")

    def __init__(self, ext_id: int) -> None:
        self.ext_id = ext_id
        self.ring = bytearray(self.HEADER.size + self.RING * self.ENTRY.size)

    def stamp(self, packet: bytes, now_us: int) -> bytes:
        (seq,) = self.HEADER.unpack_from(self.ring, 0)
        seq &= 0xFFFF
        out = stamped(packet, self.ext_id, seq)
        if out is None:
            return packet
        self.ENTRY.pack_into(self.ring, self.HEADER.size + (seq % self.RING) * self.ENTRY.size,
                             now_us & 0xFFFFFFFF, min(len(out), 0xFFFF), seq)
        self.HEADER.pack_into(self.ring, 0, (seq + 1) & 0xFFFF)
        return out

    def matched(self, body: bytes) -> tuple[list[tuple[int, int, int]], int] | None:
        """(send µs, arrival µs, size), both mod 2³², of each packet the feedback `body` (after its RTCP header)
        reports arrived that the ring still knows, what the estimator (bwe.py) takes; and how many it reports lost.
        None when malformed. The compiled estimator reads the ring itself (fastpath/_twcc.c)."""
        feedback = parse(body)
        if feedback is None:
            return None
        out = []
        for seq, arrival in feedback.arrivals:
            info = self.sent(seq)
            if info is not None:
                out.append((info[0], arrival & 0xFFFFFFFF, info[1]))
        return out, feedback.lost

    def sent(self, seq: int) -> tuple[int, int] | None:
        """(send µs mod 2³², size) of transport seq `seq`, if it is still in the ring."""
        at, size, stored = self.ENTRY.unpack_from(self.ring, self.HEADER.size + (seq % self.RING) * self.ENTRY.size)
        return (at, size) if stored == seq and size else None
