"""Audio RED (RFC 2198) as livekit-client publishes it: each packet carries the current Opus frame and copies of
the previous ones, so a subscriber that negotiated RED conceals lost packets by itself.

The media node forwards RED untouched to subscribers that take it (rewriting the inner payload type when theirs
differs) and hands the primary Opus frame to those that do not. A RED payload is a list of 4-byte block headers
(F=1, PT, timestamp offset, length), one final 1-byte header (F=0, PT), the redundant blocks, then the primary.
"""

from __future__ import annotations

from . import sdp

OPUS_FMTP = "minptime=10;useinbandfec=1"


def is_red(codec: sdp.Codec | None) -> bool:
    return codec is not None and codec.name.lower() == "red"


def inner_pt(red: sdp.Codec) -> int | None:
    """The payload type of the blocks a RED codec carries (its fmtp is `111/111`)."""
    first = red.fmtp.split("/")[0].strip()
    return int(first) if first.isdigit() else None


def opus_of(red: sdp.Codec) -> sdp.Codec:
    """The plain Opus codec a RED track's blocks are in (for subscribers that take Opus only)."""
    return sdp.Codec(inner_pt(red) or 111, "opus", 48000, 2, OPUS_FMTP)


def primary(payload: bytes) -> bytes:
    """The primary (newest) block of a RED payload; b"" if it is malformed."""
    n = len(payload)
    i = skipped = 0
    while i < n and payload[i] & 0x80:
        if i + 4 > n:
            return b""
        skipped += ((payload[i + 2] & 0x03) << 8) | payload[i + 3]
        i += 4
    start = i + 1 + skipped
    return payload[start:] if start < n else b""


def with_block_pt(payload: bytes, pt: int) -> bytes:
    """The RED payload with every block's payload type set to `pt`."""
    out = bytearray(payload)
    i, n = 0, len(out)
    while i < n:
        last = not out[i] & 0x80
        out[i] = (out[i] & 0x80) | pt
        if last:
            break
        i += 4
    return bytes(out)
