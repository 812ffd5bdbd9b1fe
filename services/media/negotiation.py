"""Offer/answer policy: which codecs, extensions and directions the media node puts on each m-line.

Pure functions over `sdp` objects; the participant decides which track goes where.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import red, rtp, sdp, twcc

AUDIO_CODECS = ("opus",)
VIDEO_CODECS = ("VP8", "H264", "VP9", "AV1")
SVC_CODECS = ("VP9", "AV1")
PUBLISH_EXTENSIONS = {
    "audio": (rtp.EXT_MID, rtp.EXT_AUDIO_LEVEL, twcc.EXT_TRANSPORT_CC),
    "video": (rtp.EXT_MID, rtp.EXT_RID, rtp.EXT_RRID, rtp.EXT_DEPENDENCY_DESCRIPTOR, twcc.EXT_TRANSPORT_CC),
}
# In our own subscriber offers: the dependency descriptor of SVC tracks (what libwebrtc's AV1 receiver needs), and
# transport-wide sequence numbers for the subscriber's feedback (bwe.py).
TWCC_OFFER_ID = 3
OFFER_EXTENSIONS = {"audio": {TWCC_OFFER_ID: twcc.EXT_TRANSPORT_CC},
                    "video": {1: rtp.EXT_DEPENDENCY_DESCRIPTOR, TWCC_OFFER_ID: twcc.EXT_TRANSPORT_CC}}
PUBLISH_FEEDBACK = {"audio": ("nack", "transport-cc"),
                    "video": ("goog-remb", "transport-cc", "ccm fir", "nack", "nack pli")}
SUBSCRIBE_FEEDBACK = {"audio": ("nack", "transport-cc"), "video": ("ccm fir", "nack", "nack pli", "transport-cc")}


def scalable(codec: sdp.Codec) -> bool:
    """Whether a track in `codec` carries its layers in one stream (SVC, svc.py)."""
    return codec.name.upper() in SVC_CODECS


class NegotiationError(ValueError):
    """The remote description cannot be answered (no common codec, malformed section)."""


@dataclass
class PublishCodec:
    codec: sdp.Codec
    rtx: sdp.Codec | None
    stereo: bool | None = None  # Opus: what the publisher should encode (it follows our answer)
    dtx: bool | None = None

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


def _feedback(media: sdp.Media, table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The feedback the node answers on `media`: transport-cc only along with the extension it reports on."""
    if twcc.EXT_TRANSPORT_CC in media.extmaps.values():
        return table[media.kind]
    return tuple(fb for fb in table[media.kind] if fb != "transport-cc")


AUDIO_NACK = ("nack",)  # answered on Opus even when not offered (as LiveKit does): libwebrtc then resends audio


def _with_feedback(codec: sdp.Codec, allowed: tuple[str, ...]) -> sdp.Codec:
    feedback = [fb for fb in codec.feedback if fb in allowed]
    if codec.name.lower() == "opus":
        feedback += [fb for fb in AUDIO_NACK if fb not in feedback]
    return sdp.Codec(codec.pt, codec.name, codec.clock, codec.channels, codec.fmtp, feedback)


def choose_publish_codec(media: sdp.Media, allow_red: bool = True, preferred: str = "") -> PublishCodec | None:
    """The codec a publisher's m-line will use, and its RTX: the track's `preferred` one (what its AddTrackRequest
    names: livekit-client asks for VP9 or AV1 there but offers VP8 first) when offered, else the first offered one
    the node forwards. Audio RED (over an offered Opus) is preferred whenever offered, unless the track disables it
    (LiveKit's preference)."""
    wanted = AUDIO_CODECS if media.kind == "audio" else VIDEO_CODECS
    wanted_upper = [w.upper() for w in wanted]
    offered_red = next((c for c in media.codecs if red.is_red(c)), None) if media.kind == "audio" else None
    if allow_red and offered_red is not None:
        inner = media.codec(red.inner_pt(offered_red) or -1)
        if inner is not None and inner.name.lower() == "opus":
            return PublishCodec(offered_red, None)
    preferred = preferred.upper()
    if preferred in wanted_upper and any(c.name.upper() == preferred for c in media.codecs):
        wanted_upper = [preferred]
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
    feedback = _feedback(media, PUBLISH_FEEDBACK)
    codecs = [_with_feedback(chosen.codec, feedback)]
    if red.is_red(chosen.codec):  # its blocks' codec is negotiated too (and carries the NACK feedback)
        inner = media.codec(red.inner_pt(chosen.codec) or -1)
        if inner is not None:
            codecs.append(_with_feedback(inner, feedback))
    codecs = [opus_params(c, chosen.stereo, chosen.dtx) for c in codecs]
    if chosen.rtx is not None:
        codecs.append(sdp.Codec(chosen.rtx.pt, chosen.rtx.name, chosen.rtx.clock, 0, chosen.rtx.fmtp))
    rids = [sdp.Rid(r.rid, "recv", r.params) for r in media.rids if r.direction == "send"]
    simulcast = ""
    if rids and media.simulcast.startswith("send "):
        simulcast = "recv " + media.simulcast[len("send "):]
    extmaps = _extensions(media)
    if not scalable(chosen.codec):
        # With the descriptor, libwebrtc leaves VP8's picture id and temporal layer out of its payload descriptor,
        # and those are what a down-track renumbers across simulcast switches and thins by (temporal.py).
        extmaps = {i: uri for i, uri in extmaps.items() if uri != rtp.EXT_DEPENDENCY_DESCRIPTOR}
    return sdp.Section(
        kind=media.kind, mid=media.mid, direction="recvonly", proto=media.proto, codecs=codecs,
        extmaps=extmaps, rids=rids, simulcast=simulcast, rtcp_rsize=media.rtcp_rsize,
    )


def match_subscribe_codec(media: sdp.Media, track_codec: sdp.Codec) -> sdp.Codec | None:
    """The subscriber's payload type for a track's codec on one of its m-lines (None: it cannot receive it).
    A RED track goes as RED to a subscriber that offers it over Opus, else as plain Opus."""
    if red.is_red(track_codec):
        offered = next((c for c in media.codecs if red.is_red(c)), None)
        inner = media.codec(red.inner_pt(offered) or -1) if offered is not None else None
        if inner is not None and inner.name.lower() == "opus":
            return offered
        track_codec = red.opus_of(track_codec)
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


def send_section(media: sdp.Media, codec: sdp.Codec, outgoing: sdp.Outgoing, stereo: bool = False) -> sdp.Section:
    """Answer to a subscriber's recvonly m-line that carries one of our tracks (a stereo Opus track says so)."""
    feedback = _feedback(media, SUBSCRIBE_FEEDBACK)
    codecs = [_with_feedback(codec, feedback)]
    if red.is_red(codec):
        inner = media.codec(red.inner_pt(codec) or -1)
        if inner is not None:
            codecs.append(_with_feedback(inner, feedback))
    if stereo:
        codecs = [opus_params(c, stereo=True) for c in codecs]
    return sdp.Section(
        kind=media.kind, mid=media.mid, direction="sendonly", proto=media.proto,
        codecs=codecs, outgoing=outgoing, extmaps=_extensions(media), rtcp_rsize=media.rtcp_rsize,
    )


def opus_params(codec: sdp.Codec, stereo: bool | None = None, dtx: bool | None = None) -> sdp.Codec:
    """`codec` with Opus stereo (`stereo`, `sprop-stereo`) and DTX (`usedtx`) set as the track wants; other
    codecs unchanged."""
    if codec.name.lower() != "opus":
        return codec
    params = codec.params()
    if stereo is not None:
        for key in ("stereo", "sprop-stereo"):
            params.pop(key, None)
            if stereo:
                params[key] = "1"
    if dtx is not None:
        params.pop("usedtx", None)
        if dtx:
            params["usedtx"] = "1"
    fmtp = ";".join(f"{k}={v}" if v else k for k, v in params.items())
    return sdp.Codec(codec.pt, codec.name, codec.clock, codec.channels, fmtp, list(codec.feedback))


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
        extmaps=dict(OFFER_EXTENSIONS[kind]),
    )


def offer_application_section(mid: str) -> sdp.Section:
    return sdp.Section(kind="application", mid=mid, proto="UDP/DTLS/SCTP")
