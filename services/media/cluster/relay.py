"""Node-to-node media relay, the data plane: one UDP socket per media node, SRTP per link, a lean packet path.

A *link* joins an origin node (it hosts the publisher) to a subscribing node (it hosts subscribers of the track) and
carries every track the subscribing node wants from that origin, however many subscribers each has there:
* origin → subscriber: RTP. Each layer of a relayed track gets an SSRC of the link; sequence numbers and timestamps
  are the publisher's, so a NACK names the same packet on both nodes. Header extensions are not relayed, except an
  SVC track's dependency descriptor (under `RELAY_DD_ID`), which the subscribers there may need.
* subscriber → origin: RTCP feedback only (PLI, FIR, NACK), sent with the link's feedback SSRC.
Both directions are SRTP (AES_CM_128_HMAC_SHA1_80: encrypted and authenticated) with per-link, per-direction master
keys the subscribing node generates and hands over on the control stream (`control.py`).

Only the layers the subscribing node's subscribers watch cross: the node says, per track, which quality caps they
want (`RelayDemand`), and the sink carries the layer the origin would give a local subscriber with each cap
(`forward.LayerRelay`).

The per-packet path never touches aiortc: `UpTrack.on_packet` calls `RelaySink.write` (rewrite the 12-byte header,
protect, `sendto`) for each relay carrying that layer; on the subscribing node `RelayEndpoint.datagram_received`
unprotects and feeds the relayed `UpTrack`, which fans out to local `DownTrack`s exactly as for a local publisher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Callable

import pylibsrtp
from pylibsrtp import Policy, Session

from .. import rtcp, rtp
from ..forward import HIGHEST, Layer, LayerRelay, UpTrack

log = logging.getLogger(__name__)

KEY_LENGTH = 30  # AES-128 key (16) + salt (14)
REPLAY_WINDOW = 1024
_pack = rtp.HEADER.pack
Address = tuple[str, int]

RELAY_DD_ID = 1  # a relayed SVC packet's dependency descriptor goes under this header extension id


def new_key() -> bytes:
    return os.urandom(KEY_LENGTH)


def srtp_session(key: bytes, outbound: bool) -> Session:
    if len(key) != KEY_LENGTH:
        raise ValueError(f"relay SRTP key must be {KEY_LENGTH} bytes")
    policy = Policy(
        key=key,
        ssrc_type=Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND,
        srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    )
    policy.allow_repeat_tx = True  # NACK answers resend a packet with the same SSRC and sequence number
    policy.window_size = REPLAY_WINDOW
    return Session(policy)


class RelayEndpoint(asyncio.DatagramProtocol):
    """The node's relay socket. RTP from a peer belongs to the inbound link from that origin; RTCP from a peer to
    the outbound link towards that subscriber. Links are found by source address; a datagram from an address no
    link knows yet is tried against the links still waiting for their first packet (NAT), which then latch it."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.host = ""
        self.port = 0
        self.inbound: dict[Address, InboundLink] = {}
        self.outbound: dict[Address, OutboundLink] = {}
        self.unlatched_in: set[InboundLink] = set()
        self.unlatched_out: set[OutboundLink] = set()
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.video_bytes_out = 0  # RTP bytes of video tracks (before SRTP), of bytes_out
        self.errors = 0

    async def open(self, ports, host: str) -> None:
        transport, _, port = await ports.bind(lambda: self)
        self.host, self.port = host, port

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def sendto(self, data: bytes, addr: Address) -> None:
        transport = self.transport
        if transport is not None:
            transport.sendto(data, addr)
            self.packets_out += 1
            self.bytes_out += len(data)

    # --- links -------------------------------------------------------------------------------------------------

    def add_inbound(self, link: InboundLink) -> None:
        if link.addr is not None:
            self.inbound[link.addr] = link
        self.unlatched_in.add(link)

    def add_outbound(self, link: OutboundLink) -> None:
        self.outbound[link.addr] = link
        self.unlatched_out.add(link)

    def remove(self, link: InboundLink | OutboundLink) -> None:
        table = self.inbound if isinstance(link, InboundLink) else self.outbound
        for addr in [a for a, l in table.items() if l is link]:
            del table[addr]
        self.unlatched_in.discard(link)  # type: ignore[arg-type]
        self.unlatched_out.discard(link)  # type: ignore[arg-type]

    # --- packets -----------------------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        if len(data) < 12:
            return
        self.packets_in += 1
        self.bytes_in += len(data)
        try:
            if 192 <= data[1] <= 223:
                link = self.outbound.get(addr)
                if link is None or not link.on_rtcp(data):
                    self._latch(data, addr, self.unlatched_out, self.outbound, rtcp_packet=True)
            else:
                link_in = self.inbound.get(addr)
                if link_in is None or not link_in.on_rtp(data):
                    self._latch(data, addr, self.unlatched_in, self.inbound, rtcp_packet=False)
        except Exception:
            self.errors += 1
            log.exception("relay packet from %s failed", addr)

    def _latch(self, data: bytes, addr: Address, waiting: set, table: dict, rtcp_packet: bool) -> None:
        for link in list(waiting):
            handled = link.on_rtcp(data) if rtcp_packet else link.on_rtp(data)
            if handled:
                waiting.discard(link)
                table[addr] = link
                if link.addr != addr:
                    log.info("relay link %s latched %s (announced %s)", link.peer, addr, link.addr)
                link.addr = addr
                return
        self.errors += 1

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable from a peer that went away
        self.errors += 1


def parse_demand(max_qualities) -> tuple[int, ...]:
    """A subscribing node's demand as the sink keeps it: distinct caps, clamped to the known qualities."""
    return tuple(sorted({min(int(q), HIGHEST) for q in max_qualities}))


class RelaySink(LayerRelay):
    """One relayed track on an outbound link: the layers its node wants, re-headed with the link's SSRCs."""

    __slots__ = ("link", "track_sid", "ssrcs", "packets", "bytes")

    def __init__(self, link: OutboundLink, up: UpTrack, track_sid: str, wants: tuple[int, ...] = (HIGHEST,)):
        super().__init__(up, wants)
        self.link = link
        self.track_sid = track_sid
        self.ssrcs: dict[Layer, int] = {}
        self.packets = self.bytes = 0

    def write(self, layer: Layer, data: bytes, header) -> None:
        ssrc = self.ssrcs.get(layer)
        if ssrc is None:
            ssrc = self.link.assign(self, layer)
        _, pt, seq, ts, marker, off, _ = header
        descriptor = rtp.extensions(data).get(self.up.dd_id) if self.up.dd_id else None
        if descriptor:
            self.link.send_rtp(rtp.with_extension(data[0], marker, pt, seq, ts, ssrc, RELAY_DD_ID, descriptor)
                               + data[off:])
        else:
            self.link.send_rtp(_pack(0x80 | (data[0] & 0x20), (marker << 7) | pt, seq, ts, ssrc) + data[off:])
        self.packets += 1
        self.bytes += len(data)
        if self.up.video:
            self.link.endpoint.video_bytes_out += len(data)
        if self.awaiting:
            self.passed(layer, data[off:off + 24])

    def forwarding_changed(self) -> None:
        self.link.on_layers(self)

    def forwarding_ssrcs(self) -> list[int]:
        return [self.ssrcs[layer] if layer in self.ssrcs else self.link.assign(self, layer, announce=False)
                for layer in self.forwarding]

    def layers(self) -> list[tuple[str, int, int]]:
        """(rid, quality, ssrc) of every layer the up-track has; assigns SSRCs to layers not yet seen."""
        for layer in self.up.layers:
            if layer not in self.ssrcs:
                self.link.assign(self, layer, announce=False)
        return [(layer.rid, layer.quality, ssrc) for layer, ssrc in self.ssrcs.items()]


class OutboundLink:
    """Origin side of a link: sends the relayed tracks to one subscribing node and answers its feedback."""

    def __init__(self, endpoint: RelayEndpoint, peer: str, addr: Address, key_down: bytes, key_up: bytes,
                 on_layers: Callable[[RelaySink], None]):
        self.endpoint = endpoint
        self.peer = peer
        self.addr = addr
        self.tx = srtp_session(key_down, outbound=True)
        self.rx = srtp_session(key_up, outbound=False)
        self.sinks: dict[str, RelaySink] = {}
        self.by_ssrc: dict[int, tuple[RelaySink, Layer]] = {}
        self.on_layers = on_layers
        self.control: Callable[[object], None] | None = None  # queues a RelayDown on the link's stream
        self.plis = self.nacks = self.retransmits = 0
        self.errors = 0
        self.closed = False

    def assign(self, sink: RelaySink, layer: Layer, announce: bool = True) -> int:
        ssrc = random.randint(1, 0xFFFFFFFF)
        while ssrc in self.by_ssrc:
            ssrc = random.randint(1, 0xFFFFFFFF)
        sink.ssrcs[layer] = ssrc
        self.by_ssrc[ssrc] = (sink, layer)
        if announce:
            self.on_layers(sink)
        return ssrc

    def attach(self, up: UpTrack, track_sid: str, wants: tuple[int, ...] = (HIGHEST,)) -> RelaySink:
        sink = self.sinks.get(track_sid)
        if sink is None or sink.up is not up:
            if sink is not None:
                self.detach(track_sid)
            sink = RelaySink(self, up, track_sid, wants)
            self.sinks[track_sid] = sink
            up.add_relay(sink)  # asks for a keyframe on each layer it starts to carry
        else:
            sink.set_wants(wants)
        return sink

    def set_demand(self, track_sid: str, wants: tuple[int, ...]) -> None:
        sink = self.sinks.get(track_sid)
        if sink is not None:
            sink.set_wants(wants)

    def detach(self, track_sid: str) -> None:
        sink = self.sinks.pop(track_sid, None)
        if sink is None:
            return
        sink.up.remove_relay(sink)
        for ssrc in sink.ssrcs.values():
            self.by_ssrc.pop(ssrc, None)

    def send_rtp(self, packet: bytes) -> None:
        try:
            data = self.tx.protect(packet)
        except pylibsrtp.Error:
            self.errors += 1
            return
        self.endpoint.sendto(data, self.addr)

    def on_rtcp(self, data: bytes) -> bool:
        try:
            plain = self.rx.unprotect_rtcp(data)
        except pylibsrtp.Error:
            return False
        for packet in rtcp.parse(plain):
            if packet.type == rtcp.PSFB and packet.fmt == rtcp.FMT_PLI:
                self._keyframe(packet.media_ssrc)
            elif packet.type == rtcp.PSFB and packet.fmt == rtcp.FMT_FIR:
                for ssrc, _ in packet.fir:
                    self._keyframe(ssrc)
            elif packet.type == rtcp.RTPFB and packet.fmt == rtcp.FMT_NACK:
                self._nack(packet.media_ssrc, packet.lost)
        return True

    def _keyframe(self, ssrc: int) -> None:
        entry = self.by_ssrc.get(ssrc)
        if entry is not None:
            self.plis += 1
            entry[0].up.request_keyframe(entry[1])

    def _nack(self, ssrc: int, lost: list[int]) -> None:
        """Resend from the layer's retransmission buffer; ask the publisher for what it no longer holds."""
        entry = self.by_ssrc.get(ssrc)
        if entry is None:
            return
        sink, layer = entry
        self.nacks += 1
        if layer.buffer is None:
            return
        missing = []
        for seq in lost:
            packet = layer.buffer.get(seq)
            if packet is None:
                missing.append(seq)
                continue
            header = rtp.parse(packet)
            if header is not None:
                sink.write(layer, packet, header)
                self.retransmits += 1
        if missing:
            sink.up.nack_upstream(layer, missing)

    def sender_reports(self) -> list[tuple[int, int, int]]:
        """(ssrc, ntp, rtp_ts) of every relayed layer whose publisher sent an SR, projected to now."""
        now = time.monotonic()
        out = []
        for ssrc, (sink, layer) in self.by_ssrc.items():
            if layer.sr_at:
                elapsed = now - layer.sr_at
                ntp = (layer.sr_ntp + int(elapsed * (1 << 32))) & 0xFFFFFFFFFFFFFFFF
                rtp_ts = (layer.sr_rtp + int(elapsed * sink.up.clock_rate)) & 0xFFFFFFFF
                out.append((ssrc, ntp, rtp_ts))
        return out

    def close(self) -> None:
        self.closed = True
        for sid in list(self.sinks):
            self.detach(sid)
        self.endpoint.remove(self)


class InboundLink:
    """Subscribing side of a link: receives relayed RTP from one origin and sends it feedback."""

    def __init__(self, endpoint: RelayEndpoint, peer: str, key_down: bytes, key_up: bytes):
        self.endpoint = endpoint
        self.peer = peer
        self.addr: Address | None = None
        self.rx = srtp_session(key_down, outbound=False)
        self.tx = srtp_session(key_up, outbound=True)
        self.by_ssrc: dict[int, tuple[UpTrack, Layer]] = {}
        self.feedback_ssrc = random.randint(1, 0xFFFFFFFF)
        self.packets = self.unknown = self.errors = 0
        self.closed = False

    def on_rtp(self, data: bytes) -> bool:
        try:
            plain = self.rx.unprotect(data)
        except pylibsrtp.Error:
            return False
        header = rtp.parse(plain)
        if header is None:
            return True
        entry = self.by_ssrc.get(header[0])
        if entry is None:
            self.unknown += 1  # its layer announcement is still on its way over the control stream
            return True
        self.packets += 1
        entry[0].on_packet(entry[1], plain, header)
        return True

    def on_rtcp(self, data: bytes) -> bool:  # an inbound link receives no RTCP
        return False

    def send_rtcp(self, packet: bytes) -> None:
        if self.addr is None or self.closed:
            return
        try:
            data = self.tx.protect_rtcp(packet)
        except pylibsrtp.Error:
            self.errors += 1
            return
        self.endpoint.sendto(data, self.addr)

    def pli(self, ssrc: int) -> None:
        self.send_rtcp(rtcp.pli(self.feedback_ssrc, ssrc))

    def nack(self, ssrc: int, seqs: list[int]) -> None:
        self.send_rtcp(rtcp.nack(self.feedback_ssrc, ssrc, seqs))

    def close(self) -> None:
        self.closed = True
        self.by_ssrc.clear()
        self.endpoint.remove(self)
