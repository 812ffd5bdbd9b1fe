"""Offer/answer policy: which codecs, extensions and directions the media node puts on each m-line.

Pure functions over `sdp` objects; the participant decides which track goes where.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import rtp, sdp

AUDIO_CODECS = ("opus",)
VIDEO_CODECS = ("VP8", "H264", "VP9", "AV1")
PUBLISH_EXTENSIONS = {
    "audio": (rtp.EXT_MID, rtp.EXT_AUDIO_LEVEL),
    "video": (rtp.EXT_MID, rtp.EXT_RID, rtp.EXT_RRID),
}
PUBLISH_FEEDBACK = {"audio": (), "video": ("goog-remb", "ccm fir", "nack", "nack pli")}
SUBSCRIBE_FEEDBACK = {"audio": (), "video": ("ccm fir", "nack", "nack pli")}


class NegotiationError(ValueError):
    """The remote description cannot be answered (no common codec, malformed section)."""


@dataclass
class PublishCodec:
    codec: sdp.Codec
    rtx: sdp.Codec | None

    def mime(self, kind: str) -> str:
        return normalize_mime(kind, self.codec.name)


def normalize_mime(kind: str, name: str) -> str:
    """LiveKit's spelling: `audio/opus`, `video/VP8`, `video/H264`."""
    upper = name.upper()
    if kind == "audio":
        return f"audio/{name.lower()}"
    return f"video/{upper}"


def _extensions(media: sdp.Media) -> dict[int, str]:
    """The offered header extensions the node understands. libwebrtc negotiates them per bundle, so every
    audio/video m-line answers them, even inactive ones: a later simulcast offer needs the RID extensions."""
    allowed = PUBLISH_EXTENSIONS.get(media.kind, ())
    return {i: uri for i, uri in media.extmaps.items() if uri in allowed}


def _with_feedback(codec: sdp.Codec, allowed: tuple[str, ...]) -> sdp.Codec:
    return sdp.Codec(codec.pt, codec.name, codec.clock, codec.channels, codec.fmtp,
                     [fb for fb in codec.feedback if fb in allowed])


def choose_publish_codec(media: sdp.Media) -> PublishCodec | None:
    """The codec a publisher's m-line will use: the first offered one the node forwards, and its RTX."""
    wanted = AUDIO_CODECS if media.kind == "audio" else VIDEO_CODECS
    wanted_upper = [w.upper() for w in wanted]
    for codec in media.codecs:
        if codec.name.upper() not in wanted_upper:
            continue
        if codec.name.upper() == "H264" and codec.params().get("packetization-mode", "0") != "1":
            if any(c.name.upper() == "H264" and c.params().get("packetization-mode") == "1" for c in media.codecs):
                continue
        rtx = next((c for c in media.codecs if c.name.lower() == "rtx" and c.apt == codec.pt), None)
        return PublishCodec(codec, rtx)
    return None


def publish_section(media: sdp.Media, chosen: PublishCodec) -> sdp.Section:
    """Answer to a publisher's sendonly m-line: we receive, with its rids if it sends simulcast."""
    codecs = [_with_feedback(chosen.codec, PUBLISH_FEEDBACK[media.kind])]
    if chosen.rtx is not None:
        codecs.append(sdp.Codec(chosen.rtx.pt, chosen.rtx.name, chosen.rtx.clock, 0, chosen.rtx.fmtp))
    rids = [sdp.Rid(r.rid, "recv", r.params) for r in media.rids if r.direction == "send"]
    simulcast = ""
    if rids and media.simulcast.startswith("send "):
        simulcast = "recv " + media.simulcast[len("send "):]
    return sdp.Section(
        kind=media.kind, mid=media.mid, direction="recvonly", proto=media.proto, codecs=codecs,
        extmaps=_extensions(media), rids=rids, simulcast=simulcast, rtcp_rsize=media.rtcp_rsize,
    )


def match_subscribe_codec(media: sdp.Media, track_codec: sdp.Codec) -> sdp.Codec | None:
    """The subscriber's payload type for a track's codec on one of its m-lines (None: it cannot receive it)."""
    name = track_codec.name.upper()
    candidates = [c for c in media.codecs if c.name.upper() == name and c.clock == track_codec.clock]
    if not candidates:
        return None
    if name == "H264":
        mode = track_codec.params().get("packetization-mode", "0")
        profile = track_codec.params().get("profile-level-id", "")[:4].lower()
        same_mode = [c for c in candidates if c.params().get("packetization-mode", "0") == mode]
        if not same_mode:
            return None
        exact = [c for c in same_mode if c.params().get("profile-level-id", "")[:4].lower() == profile]
        return (exact or same_mode)[0]
    return candidates[0]


def send_section(media: sdp.Media, codec: sdp.Codec, outgoing: sdp.Outgoing) -> sdp.Section:
    """Answer to a subscriber's recvonly m-line that carries one of our tracks."""
    return sdp.Section(
        kind=media.kind, mid=media.mid, direction="sendonly", proto=media.proto,
        codecs=[_with_feedback(codec, SUBSCRIBE_FEEDBACK[media.kind])], outgoing=outgoing,
        extmaps=_extensions(media), rtcp_rsize=media.rtcp_rsize,
    )


def inactive_section(media: sdp.Media) -> sdp.Section:
    codec = media.codecs[0] if media.codecs else sdp.Codec(0, "PCMU", 8000)
    return sdp.Section(
        kind=media.kind, mid=media.mid, direction="inactive", proto=media.proto,
        codecs=[sdp.Codec(codec.pt, codec.name, codec.clock, codec.channels, codec.fmtp)],
        extmaps=_extensions(media), rtcp_rsize=media.rtcp_rsize,
    )


def rejected_section(media: sdp.Media) -> sdp.Section:
    section = inactive_section(media)
    section.port = 0
    if media.kind not in ("audio", "video", "application"):
        section.kind = media.kind
    return section


def application_section(media: sdp.Media) -> sdp.Section:
    return sdp.Section(kind="application", mid=media.mid, proto=media.proto or "UDP/DTLS/SCTP")


def offer_track_section(mid: str, kind: str, codec: sdp.Codec, outgoing: sdp.Outgoing | None) -> sdp.Section:
    """A subscriber-PC m-line in our own offer (v0): the track's codec with its publisher payload type."""
    offered = _with_feedback(
        sdp.Codec(codec.pt, codec.name, codec.clock, codec.channels, codec.fmtp, list(SUBSCRIBE_FEEDBACK[kind])),
        SUBSCRIBE_FEEDBACK[kind],
    )
    return sdp.Section(
        kind=kind, mid=mid, direction="sendonly" if outgoing else "inactive", codecs=[offered], outgoing=outgoing,
    )


def offer_application_section(mid: str) -> sdp.Section:
    return sdp.Section(kind="application", mid=mid, proto="UDP/DTLS/SCTP")
