"""RTCP the SFU reads and writes: SR, RR, PLI, FIR, generic NACK, REMB (RFC 3550, 4585, 5104, draft-alvestrand-rmcat-remb),
and transport-wide feedback (twcc.py has its format)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from . import twcc

SR, RR, SDES, BYE, RTPFB, PSFB = 200, 201, 202, 203, 205, 206
FMT_NACK = 1
FMT_PLI, FMT_FIR, FMT_AFB = 1, 4, 15

NTP_EPOCH_OFFSET = 2208988800


@dataclass
class ReportBlock:
    ssrc: int
    fraction_lost: int = 0
    packets_lost: int = 0
    highest_seq: int = 0
    jitter: int = 0
    lsr: int = 0
    dlsr: int = 0


@dataclass
class Packet:
    """One parsed RTCP packet; fields not relevant to its type keep their defaults."""

    type: int
    fmt: int = 0
    sender_ssrc: int = 0
    media_ssrc: int = 0
    ntp: int = 0  # SR: 64-bit NTP timestamp
    rtp_ts: int = 0  # SR
    reports: list[ReportBlock] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)  # NACK: sequence numbers
    fir: list[tuple[int, int]] = field(default_factory=list)  # FIR: (ssrc, seq nr)
    bitrate: int = 0  # REMB
    ssrcs: list[int] = field(default_factory=list)  # REMB / BYE
    transport_feedback: bytes | None = None  # a transport-wide feedback's body (twcc.SentPackets.matched reads it)


def ntp_now() -> int:
    now = time.time()
    seconds = int(now)
    return ((seconds + NTP_EPOCH_OFFSET) << 32) | int((now - seconds) * (1 << 32))


def parse(data: bytes) -> list[Packet]:
    """Parse a (compound) RTCP datagram; stops at the first malformed packet."""
    out: list[Packet] = []
    pos, n = 0, len(data)
    while pos + 4 <= n:
        b0, ptype, words = struct.unpack_from("!BBH", data, pos)
        end = pos + 4 * (words + 1)
        if b0 >> 6 != 2 or end > n:
            break
        count = b0 & 0x1F
        body = data[pos + 4:end]
        try:
            packet = _parse_one(ptype, count, body)
        except (struct.error, IndexError):
            packet = None
        if packet is not None:
            out.append(packet)
        pos = end
    return out


def _blocks(body: bytes, start: int, count: int) -> list[ReportBlock]:
    blocks = []
    for i in range(count):
        off = start + 24 * i
        if off + 24 > len(body):
            break
        ssrc, lost_word, highest, jitter, lsr, dlsr = struct.unpack_from("!IIIIII", body, off)
        lost = lost_word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 0x1000000
        blocks.append(ReportBlock(ssrc, lost_word >> 24, lost, highest, jitter, lsr, dlsr))
    return blocks


def _parse_one(ptype: int, count: int, body: bytes) -> Packet | None:
    if ptype == SR:
        ssrc, ntp, rtp_ts, _, _ = struct.unpack_from("!IQIII", body)
        return Packet(SR, sender_ssrc=ssrc, ntp=ntp, rtp_ts=rtp_ts, reports=_blocks(body, 24, count))
    if ptype == RR:
        (ssrc,) = struct.unpack_from("!I", body)
        return Packet(RR, sender_ssrc=ssrc, reports=_blocks(body, 4, count))
    if ptype == BYE:
        return Packet(BYE, ssrcs=[struct.unpack_from("!I", body, 4 * i)[0] for i in range(min(count, len(body) // 4))])
    if ptype in (RTPFB, PSFB):
        sender, media = struct.unpack_from("!II", body)
        packet = Packet(ptype, fmt=count, sender_ssrc=sender, media_ssrc=media)
        fci = body[8:]
        if ptype == RTPFB and count == FMT_NACK:
            for off in range(0, len(fci) - 3, 4):
                pid, blp = struct.unpack_from("!HH", fci, off)
                packet.lost.append(pid)
                for bit in range(16):
                    if blp & (1 << bit):
                        packet.lost.append((pid + bit + 1) & 0xFFFF)
        elif ptype == RTPFB and count == twcc.FMT_TWCC:
            packet.transport_feedback = body
        elif ptype == PSFB and count == FMT_FIR:
            for off in range(0, len(fci) - 7, 8):
                ssrc, seq_word = struct.unpack_from("!II", fci, off)
                packet.fir.append((ssrc, seq_word >> 24))
        elif ptype == PSFB and count == FMT_AFB and fci[:4] == b"REMB" and len(fci) >= 8:
            num, exp_mant = fci[4], struct.unpack_from("!I", fci, 4)[0] & 0xFFFFFF
            packet.bitrate = (exp_mant & 0x3FFFF) << (exp_mant >> 18)
            packet.ssrcs = [struct.unpack_from("!I", fci, 8 + 4 * i)[0] for i in range(num) if 12 + 4 * i <= len(fci)]
        return packet
    return None


def _header(count: int, ptype: int, body_len: int) -> bytes:
    return struct.pack("!BBH", 0x80 | count, ptype, body_len // 4)


def sender_report(ssrc: int, ntp: int, rtp_ts: int, packets: int, octets: int) -> bytes:
    body = struct.pack("!IQIII", ssrc, ntp & 0xFFFFFFFFFFFFFFFF, rtp_ts & 0xFFFFFFFF,
                       packets & 0xFFFFFFFF, octets & 0xFFFFFFFF)
    return _header(0, SR, len(body)) + body


def receiver_report(ssrc: int, blocks: list[ReportBlock]) -> bytes:
    body = struct.pack("!I", ssrc)
    for b in blocks[:31]:
        lost = max(-0x800000, min(0x7FFFFF, b.packets_lost)) & 0xFFFFFF
        body += struct.pack("!IIIIII", b.ssrc, ((b.fraction_lost & 0xFF) << 24) | lost, b.highest_seq & 0xFFFFFFFF,
                            b.jitter & 0xFFFFFFFF, b.lsr & 0xFFFFFFFF, b.dlsr & 0xFFFFFFFF)
    return _header(min(len(blocks), 31), RR, len(body)) + body


def pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    return _header(FMT_PLI, PSFB, 8) + struct.pack("!II", sender_ssrc, media_ssrc)


def fir(sender_ssrc: int, media_ssrc: int, seq_nr: int) -> bytes:
    body = struct.pack("!IIII", sender_ssrc, 0, media_ssrc, (seq_nr & 0xFF) << 24)
    return _header(FMT_FIR, PSFB, len(body)) + body


def nack(sender_ssrc: int, media_ssrc: int, seqs: list[int]) -> bytes:
    """Generic NACK for the given sequence numbers (each FCI covers a pid and the 16 following)."""
    items: list[tuple[int, int]] = []
    for seq in sorted(set(s & 0xFFFF for s in seqs)):
        if items and 0 < (seq - items[-1][0]) & 0xFFFF <= 16:
            pid, blp = items[-1]
            items[-1] = (pid, blp | (1 << (((seq - pid) & 0xFFFF) - 1)))
        else:
            items.append((seq, 0))
    body = struct.pack("!II", sender_ssrc, media_ssrc) + b"".join(struct.pack("!HH", p, b) for p, b in items)
    return _header(FMT_NACK, RTPFB, len(body)) + body


def remb(sender_ssrc: int, bitrate: int, ssrcs: list[int]) -> bytes:
    exp = 0
    mantissa = max(0, int(bitrate))
    while mantissa > 0x3FFFF:
        mantissa >>= 1
        exp += 1
    body = struct.pack("!II4sB", sender_ssrc, 0, b"REMB", len(ssrcs))
    body += ((exp << 18) | mantissa).to_bytes(3, "big")
    body += b"".join(struct.pack("!I", s) for s in ssrcs)
    return _header(FMT_AFB, PSFB, len(body)) + body
