"""A small SDP reader and writer for the media node's own offer/answer logic.

aiortc's SDP module drops attributes an SFU needs (`a=rid`, `a=simulcast`, `a=msid` per m-line, raw fmtp of
codecs it does not know), so the media node parses offers itself and writes its answers and offers line by line.
Policy (which codecs, which direction, which track on which m-line) lives in `negotiation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class SdpError(ValueError):
    """The text is not an SDP the media node can negotiate."""


@dataclass
class Codec:
    pt: int
    name: str  # as written in rtpmap, e.g. "VP8", "opus", "rtx"
    clock: int
    channels: int = 0
    fmtp: str = ""
    feedback: list[str] = field(default_factory=list)

    def mime(self, kind: str) -> str:
        """`audio/opus`, `video/VP8`: LiveKit's spelling of a codec."""
        return f"{kind}/{self.name}"

    def params(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.fmtp.split(";"):
            key, sep, value = part.strip().partition("=")
            if key:
                out[key.strip().lower()] = value.strip() if sep else ""
        return out

    @property
    def apt(self) -> int | None:
        """The payload type a `rtx` codec repairs."""
        value = self.params().get("apt")
        return int(value) if value and value.isdigit() else None


@dataclass
class Rid:
    rid: str
    direction: str  # "send" | "recv"
    params: str = ""


@dataclass
class Media:
    kind: str  # "audio" | "video" | "application" | other
    port: int
    proto: str
    fmts: list[str]
    mid: str = ""
    direction: str = "sendrecv"
    codecs: list[Codec] = field(default_factory=list)
    extmaps: dict[int, str] = field(default_factory=dict)
    ssrcs: dict[int, dict[str, str]] = field(default_factory=dict)
    ssrc_groups: list[tuple[str, list[int]]] = field(default_factory=list)
    rids: list[Rid] = field(default_factory=list)
    simulcast: str = ""
    msid: tuple[str, str] | None = None
    ice_ufrag: str = ""
    ice_pwd: str = ""
    fingerprints: list[tuple[str, str]] = field(default_factory=list)
    setup: str = ""
    candidates: list[str] = field(default_factory=list)
    rtcp_mux: bool = False
    rtcp_rsize: bool = False
    sctp_port: int = 0
    max_message_size: int = 0

    @property
    def rejected(self) -> bool:
        return self.port == 0

    @property
    def sends(self) -> bool:
        """The remote side sends media on this m-line."""
        return self.direction in ("sendonly", "sendrecv")

    @property
    def receives(self) -> bool:
        return self.direction in ("recvonly", "sendrecv")

    def codec(self, pt: int) -> Codec | None:
        for codec in self.codecs:
            if codec.pt == pt:
                return codec
        return None

    def extmap_id(self, uri: str) -> int | None:
        for ext_id, ext_uri in self.extmaps.items():
            if ext_uri == uri:
                return ext_id
        return None

    def msid_track_id(self) -> str:
        if self.msid:
            return self.msid[1]
        for attrs in self.ssrcs.values():
            parts = attrs.get("msid", "").split()
            if len(parts) == 2:
                return parts[1]
        return ""


@dataclass
class Session:
    media: list[Media]
    bundle: list[str] = field(default_factory=list)
    ice_lite: bool = False
    allow_mixed: bool = False  # extmap-allow-mixed (RFC 8285): two-byte header extensions may be sent

    def by_mid(self, mid: str) -> Media | None:
        for media in self.media:
            if media.mid == mid:
                return media
        return None


_DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
MAX_SDP_BYTES = 256 * 1024


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SdpError(f"invalid {what}: {text!r}") from None


def parse(text: str) -> Session:
    """Parse an SDP; raises SdpError for anything that cannot be negotiated (no m-lines, no ICE or DTLS)."""
    if not isinstance(text, str) or not text.strip():
        raise SdpError("empty SDP")
    if len(text) > MAX_SDP_BYTES:
        raise SdpError("SDP too large")
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or not lines[0].startswith("v="):
        raise SdpError("SDP must start with v=")
    session = Session(media=[])
    s_ufrag = s_pwd = s_setup = ""
    s_fingerprints: list[tuple[str, str]] = []
    current: Media | None = None
    fmtps: dict[int, str] = {}
    for line in lines:
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"malformed line: {line[:40]!r}")
        kind, value = line[0], line[2:]
        if kind == "m":
            if current is not None:
                _finish(current, fmtps)
            parts = value.split()
            if len(parts) < 3:
                raise SdpError(f"malformed m-line: {value[:60]!r}")
            current = Media(kind=parts[0], port=_int(parts[1].split("/")[0], "port"), proto=parts[2],
                            fmts=parts[3:])
            fmtps = {}
            session.media.append(current)
            continue
        if kind != "a":
            continue
        name, _, arg = value.partition(":")
        if current is None:
            if name == "group" and arg.startswith("BUNDLE"):
                session.bundle = arg.split()[1:]
            elif name == "ice-lite":
                session.ice_lite = True
            elif name == "extmap-allow-mixed":
                session.allow_mixed = True
            elif name == "ice-ufrag":
                s_ufrag = arg
            elif name == "ice-pwd":
                s_pwd = arg
            elif name == "fingerprint":
                s_fingerprints.append(_fingerprint(arg))
            elif name == "setup":
                s_setup = arg
            continue
        _media_attr(current, name, arg, fmtps)
    if current is not None:
        _finish(current, fmtps)
    if not session.media:
        raise SdpError("SDP has no media sections")
    # Bundled m-lines may leave the transport attributes to the first one (RFC 8843).
    donor = next((m for m in session.media if m.ice_ufrag and m.ice_pwd), None)
    if donor is not None:
        s_ufrag, s_pwd = s_ufrag or donor.ice_ufrag, s_pwd or donor.ice_pwd
        s_setup = s_setup or donor.setup
        s_fingerprints = s_fingerprints or donor.fingerprints
    for media in session.media:
        media.ice_ufrag = media.ice_ufrag or s_ufrag
        media.ice_pwd = media.ice_pwd or s_pwd
        media.setup = media.setup or s_setup
        media.fingerprints = media.fingerprints or list(s_fingerprints)
        if not media.rejected and (not media.ice_ufrag or not media.ice_pwd):
            raise SdpError(f"m-line {media.mid or '?'} has no ICE credentials")
        if not media.rejected and not media.fingerprints:
            raise SdpError(f"m-line {media.mid or '?'} has no DTLS fingerprint")
    return session


def _fingerprint(arg: str) -> tuple[str, str]:
    alg, _, value = arg.partition(" ")
    if not value:
        raise SdpError("malformed fingerprint")
    return alg.lower(), value.strip().upper()


def _media_attr(m: Media, name: str, arg: str, fmtps: dict[int, str]) -> None:
    if name in _DIRECTIONS:
        m.direction = name
    elif name == "mid":
        m.mid = arg
    elif name == "rtpmap":
        pt_text, _, enc = arg.partition(" ")
        bits = enc.split("/")
        if len(bits) < 2:
            raise SdpError(f"malformed rtpmap: {arg[:40]!r}")
        m.codecs.append(Codec(pt=_int(pt_text, "payload type"), name=bits[0], clock=_int(bits[1], "clock rate"),
                              channels=_int(bits[2], "channels") if len(bits) > 2 else 0))
    elif name == "fmtp":
        pt_text, _, params = arg.partition(" ")
        fmtps[_int(pt_text, "payload type")] = params.strip()
    elif name == "rtcp-fb":
        pt_text, _, fb = arg.partition(" ")
        for codec in m.codecs:
            if pt_text == "*" or str(codec.pt) == pt_text:
                codec.feedback.append(fb.strip())
    elif name == "extmap":
        ext, _, uri = arg.partition(" ")
        ext_id = _int(ext.split("/")[0], "extmap id")
        m.extmaps[ext_id] = uri.split()[0] if uri else ""
    elif name == "ssrc":
        ssrc_text, _, attr = arg.partition(" ")
        key, _, val = attr.partition(":")
        m.ssrcs.setdefault(_int(ssrc_text, "ssrc"), {})[key] = val
    elif name == "ssrc-group":
        parts = arg.split()
        if parts:
            m.ssrc_groups.append((parts[0], [_int(s, "ssrc") for s in parts[1:]]))
    elif name == "rid":
        parts = arg.split(None, 2)
        if len(parts) >= 2:
            m.rids.append(Rid(parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    elif name == "simulcast":
        m.simulcast = arg.strip()
    elif name == "msid":
        parts = arg.split()
        if parts:
            m.msid = (parts[0], parts[1] if len(parts) > 1 else "")
    elif name == "ice-ufrag":
        m.ice_ufrag = arg
    elif name == "ice-pwd":
        m.ice_pwd = arg
    elif name == "fingerprint":
        m.fingerprints.append(_fingerprint(arg))
    elif name == "setup":
        m.setup = arg
    elif name == "candidate":
        m.candidates.append(arg)
    elif name == "rtcp-mux":
        m.rtcp_mux = True
    elif name == "rtcp-rsize":
        m.rtcp_rsize = True
    elif name == "sctp-port":
        m.sctp_port = _int(arg, "sctp-port")
    elif name == "max-message-size":
        m.max_message_size = _int(arg, "max-message-size")


def _finish(m: Media, fmtps: dict[int, str]) -> None:
    for codec in m.codecs:
        codec.fmtp = fmtps.get(codec.pt, "")
    if m.kind == "application" and not m.sctp_port and m.fmts and m.fmts[0].isdigit():
        m.sctp_port = int(m.fmts[0])  # legacy "DTLS/SCTP 5000"


# --- writing -------------------------------------------------------------------------------------------------


@dataclass
class Transport:
    """Our side of the bundle: written into every m-line."""

    ice_ufrag: str
    ice_pwd: str
    fingerprints: list[tuple[str, str]]
    setup: str  # "active" | "passive" | "actpass"
    candidates: list[str]  # "foundation component ... typ host" (without "candidate:")


@dataclass
class Outgoing:
    """A stream we send on an m-line."""

    ssrc: int
    cname: str
    stream_id: str  # "PA_x|TR_y"
    track_id: str  # "TR_y"


@dataclass
class Section:
    """One m-line to write."""

    kind: str
    mid: str
    direction: str = "inactive"
    port: int = 9
    proto: str = "UDP/TLS/RTP/SAVPF"
    codecs: list[Codec] = field(default_factory=list)
    extmaps: dict[int, str] = field(default_factory=dict)
    outgoing: Outgoing | None = None
    rids: list[Rid] = field(default_factory=list)
    simulcast: str = ""
    rtcp_rsize: bool = True
    sctp_port: int = 5000
    max_message_size: int = 262144


def write(sections: list[Section], transport: Transport, session_id: int, version: int,
          allow_mixed: bool = False) -> str:
    out = [
        "v=0",
        f"o=- {session_id} {version} IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
    ]
    bundle = [s.mid for s in sections if s.port != 0]
    if bundle:
        out.append("a=group:BUNDLE " + " ".join(bundle))
    if allow_mixed:
        out.append("a=extmap-allow-mixed")
    out.append("a=msid-semantic: WMS *")
    for section in sections:
        out.extend(_section_lines(section, transport))
    return "\r\n".join(out) + "\r\n"


def _section_lines(s: Section, t: Transport) -> list[str]:
    if s.kind == "application":
        lines = [f"m=application {s.port} {s.proto} webrtc-datachannel", "c=IN IP4 0.0.0.0"]
    else:
        fmts = " ".join(str(c.pt) for c in s.codecs) or "0"
        lines = [f"m={s.kind} {s.port} {s.proto} {fmts}", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0"]
    lines += [f"a=ice-ufrag:{t.ice_ufrag}", f"a=ice-pwd:{t.ice_pwd}"]
    lines += [f"a=fingerprint:{alg} {value}" for alg, value in t.fingerprints]
    lines += [f"a=setup:{t.setup}", f"a=mid:{s.mid}"]
    if s.kind == "application":
        lines += [f"a=sctp-port:{s.sctp_port}", f"a=max-message-size:{s.max_message_size}"]
    else:
        lines += [f"a=extmap:{ext_id} {uri}" for ext_id, uri in sorted(s.extmaps.items())]
        lines.append(f"a={s.direction}")
        if s.outgoing is not None and s.direction in ("sendonly", "sendrecv"):
            lines.append(f"a=msid:{s.outgoing.stream_id} {s.outgoing.track_id}")
        lines.append("a=rtcp-mux")
        if s.rtcp_rsize:
            lines.append("a=rtcp-rsize")
        for codec in s.codecs:
            enc = f"{codec.name}/{codec.clock}" + (f"/{codec.channels}" if codec.channels else "")
            lines.append(f"a=rtpmap:{codec.pt} {enc}")
            lines += [f"a=rtcp-fb:{codec.pt} {fb}" for fb in codec.feedback]
            if codec.fmtp:
                lines.append(f"a=fmtp:{codec.pt} {codec.fmtp}")
        for rid in s.rids:
            lines.append(f"a=rid:{rid.rid} {rid.direction}" + (f" {rid.params}" if rid.params else ""))
        if s.simulcast:
            lines.append(f"a=simulcast:{s.simulcast}")
        if s.outgoing is not None and s.direction in ("sendonly", "sendrecv"):
            o = s.outgoing
            lines += [f"a=ssrc:{o.ssrc} cname:{o.cname}", f"a=ssrc:{o.ssrc} msid:{o.stream_id} {o.track_id}"]
    if s.port != 0:
        lines += [f"a=candidate:{c}" for c in t.candidates]
        lines.append("a=end-of-candidates")
    return lines
