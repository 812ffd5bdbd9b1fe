"""The aiortc / aioice internals the media node relies on, pinned and exercised.

If an upgrade moves any of these, this file fails first (see services/media/transport.py and ice.py).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import socket
import struct

import aioice.ice
import pytest
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport

from braid.services.media import rtp, sdp
from braid.services.media.ice import IceHost, MediaProtocol, PortRange
from braid.services.media.icemux import node_ice_host
from braid.services.media.transport import PeerTransport


def test_pinned_versions():
    assert importlib.metadata.version("aiortc") == "1.16.0"
    assert importlib.metadata.version("aioice") == "0.13.0"


def test_private_attributes_exist():
    dtls_src = inspect.getsource(RTCDtlsTransport)
    for name in ("_rx_srtp", "_tx_srtp", "_handle_rtp_data", "_handle_rtcp_data", "_set_role", "_ssl", "_role",
                 "_srtp_profiles", 'b"EXTRACTOR-dtls_srtp"', "get_key_and_salt(view, 1)"):
        assert name in dtls_src, name
    assert "await self._handle_rtp_data(data, arrival_time_ms=arrival_time_ms)" in dtls_src
    gatherer = RTCIceGatherer(iceServers=[])
    assert isinstance(gatherer._connection, aioice.ice.Connection)
    assert "self._connection = gatherer._connection" in inspect.getsource(RTCIceTransport.__init__)
    conn = aioice.ice.Connection(ice_controlling=False)
    for name in ("_nominated", "_protocols", "_local_candidates", "_local_candidates_start", "_local_candidates_end"):
        assert hasattr(conn, name), name
    assert "datagram_received" in aioice.ice.StunProtocol.__dict__
    assert inspect.signature(aioice.ice.Connection.get_component_candidates).parameters.keys() >= {
        "component", "addresses"}


def test_ice_restart_seams_exist():
    """ice.py's in-place ICE restart overrides these aioice internals (see NodeIceConnection)."""
    conn = aioice.ice.Connection(ice_controlling=False)
    for name in ("_local_username", "_local_password", "_remote_candidates_end", "remote_username",
                 "remote_password"):
        assert hasattr(conn, name), name
    for name in ("request_received", "check_complete", "_valid_username"):
        assert name in aioice.ice.Connection.__dict__, name
    assert list(inspect.signature(aioice.ice.Connection.request_received).parameters) == [
        "self", "message", "addr", "protocol"]
    assert "self._valid_username(" in inspect.getsource(aioice.ice.Connection.request_received)
    assert "self.local_password" in inspect.getsource(aioice.ice.Connection.request_received)


async def test_port_range_binds_inside_the_range():
    host = IceHost.port_range(PortRange(41000, 41003, host="127.0.0.1"), "127.0.0.1")
    conns = [host.connection(controlling=False) for _ in range(4)]
    for conn in conns:
        await conn.gather_candidates()
    got = sorted(c.local_candidates[0].port for c in conns)
    assert got == [41000, 41001, 41002, 41003]
    assert all(c.local_candidates[0].host == "127.0.0.1" for c in conns)
    extra = host.connection(controlling=False)
    with pytest.raises(OSError):
        await extra.gather_candidates()
    for conn in conns:
        await conn.close()


async def test_announced_ip_differs_from_bind():
    conn = IceHost.port_range(PortRange(41010, 41012, host="127.0.0.1"), "203.0.113.7").connection(False)
    await conn.gather_candidates()
    assert conn.local_candidates[0].host == "203.0.113.7"
    assert isinstance(conn._protocols[0], MediaProtocol)
    await conn.close()


def _pair_sections(pc: PeerTransport, setup: str) -> str:
    sections = [sdp.Section(kind="video", mid="0", direction="sendrecv",
                            codecs=[sdp.Codec(96, "VP8", 90000)])]
    return sdp.write(sections, pc.local_transport(setup), 1, 1)


@pytest.mark.parametrize("mode", ["port range", "shared UDP port"])
async def test_two_transports_exchange_srtp_on_the_fast_lane(mode):
    """Offerer and answerer PeerTransports connect over loopback and move RTP/RTCP through the taps: each on a
    socket of its own, or the answerer on a node's shared UDP port."""
    own = IceHost.port_range(PortRange(41020, 41030, host="127.0.0.1"), "127.0.0.1")
    node = await node_ice_host("127.0.0.1", 0, 0, PortRange(41031, 41040, host="127.0.0.1")) if mode == "port range" \
        else await node_ice_host("127.0.0.1", _free_udp_port(), 0, PortRange(41031, 41040, host="127.0.0.1"))
    cert = RTCCertificate.generateCertificate()
    got: dict[str, list[bytes]] = {"a_rtp": [], "b_rtp": [], "b_rtcp": []}
    states: dict[str, list[str]] = {"a": [], "b": []}

    def make(name: str, offerer: bool) -> PeerTransport:
        return PeerTransport(
            ice=own if offerer else node, certificate=cert, offerer=offerer, label=name,
            on_rtp=got[f"{name}_rtp"].append, on_rtcp=(got["b_rtcp"].append if name == "b" else lambda d: None),
            on_state=states[name].append,
        )

    a, b = make("a", True), make("b", False)
    await a.prepare()
    await b.prepare()
    offer = sdp.parse(_pair_sections(a, "actpass"))
    b.set_remote(offer, is_offer=True)
    answer = sdp.parse(_pair_sections(b, b.answer_setup))
    a.set_remote(answer, is_offer=False)
    for _ in range(200):
        if a.state == "connected" and b.state == "connected":
            break
        await asyncio.sleep(0.02)
    assert (a.state, b.state) == ("connected", "connected")
    assert a.ice_conn._nominated[1].protocol.fast is not None and b.ice_conn._nominated[1].protocol.fast is not None
    for seq in range(5):
        a.send_rtp(rtp.HEADER.pack(0x80, 96, seq, 1000 * seq, 1234) + b"payload")
    a.send_rtcp(struct.pack("!BBHII", 0x81, 206, 2, 1, 1234))  # PLI
    b.send_rtp(rtp.HEADER.pack(0x80, 96, 7, 0, 999) + b"back")
    for _ in range(100):
        if len(got["b_rtp"]) == 5 and got["b_rtcp"] and got["a_rtp"]:
            break
        await asyncio.sleep(0.01)
    assert [rtp.parse(p)[2] for p in got["b_rtp"]] == [0, 1, 2, 3, 4]
    assert got["b_rtp"][0].endswith(b"payload")
    assert got["b_rtcp"][0][1] == 206
    assert got["a_rtp"][0].endswith(b"back")
    await a.close()
    await b.close()
    assert a.state == b.state == "closed"
    node.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
