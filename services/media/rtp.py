"""RTP on the hot path: header fields, header extensions, keyframe detection, rewritten headers.

Everything here works on the decrypted packet bytes and never decodes media.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_FIXED = struct.Struct("!BBHII")
HEADER = _FIXED  # (b0, b1, seq, ts, ssrc)

# Header extension URIs the media node reads from publishers.
EXT_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
EXT_RID = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
EXT_RRID = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
EXT_AUDIO_LEVEL = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
EXT_DEPENDENCY_DESCRIPTOR = "https://aomediacodec.github.io/av1-rtp-spec/#dependency-descriptor-rtp-header-extension"


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 demultiplexing: RTCP packet types 192-223 sit in the second byte."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def parse(data: bytes) -> tuple[int, int, int, int, int, int, int] | None:
    """(ssrc, payload type, seq, timestamp, marker, payload offset, payload end) or None if malformed."""
    n = len(data)
    if n < 12:
        return None
    b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data)
    if b0 >> 6 != 2:
        return None
    off = 12 + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        if n < off + 4:
            return None
        off += 4 + 4 * ((data[off + 2] << 8) | data[off + 3])
    end = n
    if b0 & 0x20:
        end -= data[-1]
    if off > end:
        return None
    return ssrc, b1 & 0x7F, seq, ts, b1 >> 7, off, end


def extensions(data: bytes) -> dict[int, bytes]:
    """Header extensions by id (RFC 8285 one-byte and two-byte forms)."""
    out: dict[int, bytes] = {}
    if len(data) < 12 or not data[0] & 0x10:
        return out
    off = 12 + 4 * (data[0] & 0x0F)
    if len(data) < off + 4:
        return out
    profile = (data[off] << 8) | data[off + 1]
    length = 4 * ((data[off + 2] << 8) | data[off + 3])
    pos, end = off + 4, min(off + 4 + length, len(data))
    if profile == 0xBEDE:
        while pos < end:
            byte = data[pos]
            if byte == 0:
                pos += 1
                continue
            ext_id, size = byte >> 4, (byte & 0x0F) + 1
            if ext_id == 15:
                break
            out[ext_id] = bytes(data[pos + 1:pos + 1 + size])
            pos += 1 + size
    elif profile & 0xFFF0 == 0x1000:
        while pos + 1 < end:
            ext_id = data[pos]
            if ext_id == 0:
                pos += 1
                continue
            size = data[pos + 1]
            out[ext_id] = bytes(data[pos + 2:pos + 2 + size])
            pos += 2 + size
    return out


def is_keyframe(mime: str, payload: bytes | memoryview) -> bool:
    """Whether this packet starts a frame that can be decoded on its own."""
    if not payload:
        return False
    if mime == "video/VP8":
        return _vp8_keyframe(payload)
    if mime == "video/H264":
        return _h264_keyframe(payload)
    if mime == "video/VP9":
        b = payload[0]
        return not b & 0x40 and bool(b & 0x08)  # not inter-predicted, beginning of a frame
    if mime == "video/AV1":
        return bool(payload[0] & 0x08)  # N: first packet of a coded video sequence
    return False


def _vp8_keyframe(p: bytes | memoryview) -> bool:
    b0 = p[0]
    if not b0 & 0x10 or b0 & 0x07:  # S (start of partition) and partition index 0
        return False
    off = 1
    if b0 & 0x80:  # X: extended control bits
        if len(p) < 2:
            return False
        x = p[1]
        off = 2
        if x & 0x80:  # I: picture id
            if len(p) <= off:
                return False
            off += 2 if p[off] & 0x80 else 1
        if x & 0x40:  # L: TL0PICIDX
            off += 1
        if x & 0x30:  # T or K
            off += 1
    return len(p) > off and not p[off] & 0x01  # P bit of the VP8 frame tag: 0 = key frame


@dataclass(frozen=True, slots=True)
class Vp8Ids:
    """Where a VP8 payload descriptor (RFC 7741) keeps its picture id and TL0PICIDX, and their values.

    A subscriber's decoder orders frames by picture id: simulcast layers number their pictures independently,
    so a down-track switching layers renumbers them to continue its own sequence (a jump back makes the receiver
    drop every frame as already seen)."""

    picture_id: int
    pid_mask: int  # 0x7F or 0x7FFF: the field's width; 0 when the descriptor has no picture id
    pid_pos: int
    tl0: int  # -1 when absent
    tl0_pos: int
    temporal: int = -1  # TID, -1 when absent (a stream without temporal layers)
    sync: bool = False  # Y: the frame refers only to base-layer frames
    begins: bool = False  # S set on partition 0: the picture's first packet


def vp8_ids(p: bytes | memoryview) -> Vp8Ids | None:
    """The picture id, TL0PICIDX and temporal layer of a VP8 payload, or None when it carries neither id (or is
    truncated)."""
    if len(p) < 2 or not p[0] & 0x80:
        return None
    x = p[1]
    pos = 2
    pid, mask, pid_pos = 0, 0, 0
    if x & 0x80:
        if len(p) <= pos:
            return None
        pid_pos = pos
        if p[pos] & 0x80:
            if len(p) <= pos + 1:
                return None
            pid, mask = ((p[pos] & 0x7F) << 8) | p[pos + 1], 0x7FFF
            pos += 2
        else:
            pid, mask = p[pos], 0x7F
            pos += 1
    tl0, tl0_pos = -1, 0
    if x & 0x40:
        if len(p) <= pos:
            return None
        tl0, tl0_pos = p[pos], pos
        pos += 1
    temporal, sync = -1, False
    if x & 0x20:  # T: TID and Y
        if len(p) <= pos:
            return None
        temporal, sync = p[pos] >> 6, bool(p[pos] & 0x20)
    if not mask and tl0 < 0:
        return None
    return Vp8Ids(pid, mask, pid_pos, tl0, tl0_pos, temporal, sync, p[0] & 0x17 == 0x10)


def vp8_renumbered(p: bytes, ids: Vp8Ids, pid_off: int, tl0_off: int) -> bytes:
    """The payload with its picture id and TL0PICIDX moved on by the given offsets (each wraps in its width)."""
    out = bytearray(p)
    if ids.pid_mask == 0x7FFF:
        pid = (ids.picture_id + pid_off) & 0x7FFF
        out[ids.pid_pos], out[ids.pid_pos + 1] = 0x80 | (pid >> 8), pid & 0xFF
    elif ids.pid_mask:
        out[ids.pid_pos] = (ids.picture_id + pid_off) & 0x7F
    if ids.tl0 >= 0:
        out[ids.tl0_pos] = (ids.tl0 + tl0_off) & 0xFF
    return bytes(out)


def _h264_keyframe(p: bytes | memoryview) -> bool:
    nal = p[0] & 0x1F
    if nal in (5, 7):
        return True
    if nal == 24:  # STAP-A
        pos = 1
        while pos + 2 < len(p):
            size = (p[pos] << 8) | p[pos + 1]
            if pos + 2 < len(p) and p[pos + 2] & 0x1F in (5, 7):
                return True
            pos += 2 + size
        return False
    if nal == 28 and len(p) > 1:  # FU-A: start fragment of an IDR/SPS
        return bool(p[1] & 0x80) and p[1] & 0x1F in (5, 7)
    return False


def with_extension(b0: int, marker: int, pt: int, seq: int, ts: int, ssrc: int, ext_id: int, value: bytes) -> bytes:
    """A 12-byte header followed by one header extension (RFC 8285: the one-byte form when it fits, else the
    two-byte form, which needs `extmap-allow-mixed`)."""
    if ext_id < 15 and 0 < len(value) <= 16:
        body = bytes([(ext_id << 4) | (len(value) - 1)]) + value
        profile = 0xBEDE
    else:
        body = bytes([ext_id, len(value)]) + value
        profile = 0x1000
    body += b"\0" * (-len(body) % 4)
    return _FIXED.pack(0x90 | (b0 & 0x20), (marker << 7) | pt, seq, ts, ssrc) + struct.pack(
        "!HH", profile, len(body) // 4) + body


def rewrite(b0: int, marker: int, pt: int, seq: int, ts: int, ssrc: int, payload: bytes) -> bytes:
    """A new packet: no CSRCs and no header extensions, the given identity, the same payload (and padding)."""
    return _FIXED.pack(0x80 | (b0 & 0x20), (marker << 7) | pt, seq, ts, ssrc) + payload


def extension(data: bytes, ext_id: int) -> tuple[int, int] | None:
    """(offset, length) of one header extension element's value, in either RFC 8285 form: per packet, so it
    scans for that element instead of collecting them all as `extensions` does."""
    if len(data) < 16 or not data[0] & 0x10:
        return None
    off = 12 + 4 * (data[0] & 0x0F)
    if off + 4 > len(data):
        return None
    profile = (data[off] << 8) | data[off + 1]
    pos = off + 4
    end = min(pos + 4 * ((data[off + 2] << 8) | data[off + 3]), len(data))
    if profile == 0xBEDE:
        while pos < end:
            byte = data[pos]
            if byte == 0:
                pos += 1
                continue
            if byte >> 4 == 15:
                return None
            size = (byte & 0x0F) + 1
            if byte >> 4 == ext_id:
                return (pos + 1, size) if pos + 1 + size <= end else None
            pos += 1 + size
    elif profile & 0xFFF0 == 0x1000:
        while pos + 1 < end:
            if data[pos] == 0:
                pos += 1
                continue
            size = data[pos + 1]
            if data[pos] == ext_id:
                return (pos + 2, size) if pos + 2 + size <= end else None
            pos += 2 + size
    return None


def audio_level(data: bytes, ext_id: int) -> int | None:
    """The RFC 6464 level (dBov, 0 loudest … 127 silence), if the packet carries it."""
    found = extension(data, ext_id)
    return data[found[0]] & 0x7F if found is not None else None
    off = 12 + 4 * (data[0] & 0x0F)
    if data[off] != 0xBE or data[off + 1] != 0xDE:
        return None
    pos = off + 4
    end = min(pos + 4 * ((data[off + 2] << 8) | data[off + 3]), len(data))
    while pos < end:
        byte = data[pos]
        if byte == 0:
            pos += 1
            continue
        if byte >> 4 == ext_id:
            return data[pos + 1] & 0x7F if pos + 1 < end else None
        pos += 2 + (byte & 0x0F)
    return None
