"""Which down-track a subscriber gets for a track: the plain one (the only kind the compiled fan-out serves), one
that converts audio RED to what the subscriber negotiated, or one that picks its layers out of a VP9 or AV1 SVC stream."""

from __future__ import annotations

from typing import Callable

from . import red, sdp
from .forward import DownTrack, UpTrack
from .svc import SVC_CODECS, SvcDownTrack


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


def down_track(up: UpTrack, send: Callable[[bytes], None], track_codec: sdp.Codec, codec: sdp.Codec,
               output=None) -> DownTrack:
    """The down-track for a subscriber that negotiated `codec` for a track published as `track_codec`. Only plain
    forwarding takes the compiled path (`output`); the RED conversions and SVC stay in their Python `write`."""
    if track_codec.name.upper() in SVC_CODECS:
        return SvcDownTrack(up, send, codec.pt)
    if not red.is_red(track_codec):
        return DownTrack(up, send, codec.pt, output=output)
    if not red.is_red(codec):
        return UnwrappingDownTrack(up, send, codec.pt)
    theirs, ours = red.inner_pt(codec), red.inner_pt(track_codec)
    if theirs is not None and theirs != ours:
        return RepayloadingDownTrack(up, send, codec.pt, theirs)
    return DownTrack(up, send, codec.pt, output=output)
