"""One UDP port per media node (issue 11): the shared socket's demultiplexing, and 50 participants with media on it.

The unit tests drive `UdpMux` with real sockets on loopback; the 50-participant test joins raw protocol clients
(benchmarks/rawclient.py: real signalling, ICE, DTLS and SRTP, no codecs) to a real `braid-server`.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from aioice import stun
from aiortc.rtcdtlstransport import RTCCertificate

from benchmarks.rawclient import join_subscribers, start_publisher
from braid.clients.harness import join_token
from braid.services.media.ice import IceHost, PortRange
from braid.services.media.icemux import MAX_ADDRESSES, SharedProtocol, node_ice_host

from .servers import free_port

pytestmark = pytest.mark.timeout(120)


def _check(ufrag: str, password: str) -> bytes:
    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    message.attributes["USERNAME"] = f"{ufrag}:peer"
    message.attributes["PRIORITY"] = 1
    message.attributes["ICE-CONTROLLING"] = 1
    message.add_message_integrity(password.encode())
    message.add_fingerprint()
    return bytes(message)


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.got.append(data)


async def _peer() -> Peer:
    _, peer = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    return peer


async def _settle(condition, timeout: float = 2.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def test_checks_are_routed_by_ufrag_and_addresses_bound_only_once_answered():
    host = await node_ice_host("127.0.0.1", free_port(socket.SOCK_DGRAM), 0, PortRange(41100, 41110, "127.0.0.1"))
    [mux] = host.sources
    port = mux.port
    conns = [host.connection(controlling=False) for _ in range(3)]
    for conn in conns:
        await conn.gather_candidates()
        assert [c.port for c in conn.local_candidates] == [port]
        conn.remote_username, conn.remote_password = "peer", "p" * 22
    a, b, stranger = await _peer(), await _peer(), await _peer()
    addr_a, addr_b = a.transport.get_extra_info("sockname"), b.transport.get_extra_info("sockname")
    checking = [asyncio.create_task(conn.connect()) for conn in conns]  # answered checks become pairs
    try:
        # Media and DTLS from an address nobody owns are dropped; so is a check for an unknown ufrag.
        stranger.transport.sendto(b"\x80" + os.urandom(40), ("127.0.0.1", port))
        stranger.transport.sendto(b"\x16" + os.urandom(40), ("127.0.0.1", port))
        stranger.transport.sendto(_check("nobody" * 3, "x" * 22), ("127.0.0.1", port))
        # A check with a wrong password is answered 401 and binds nothing.
        stranger.transport.sendto(_check(conns[0].local_username, "w" * 22), ("127.0.0.1", port))
        assert await _settle(lambda: mux.dropped == 3 and len(stranger.got) == 1)
        assert stun.parse_message(stranger.got[0]).message_class == stun.Class.ERROR
        assert not mux.by_address

        a.transport.sendto(_check(conns[0].local_username, conns[0].local_password), ("127.0.0.1", port))
        b.transport.sendto(_check(conns[1].local_username, conns[1].local_password), ("127.0.0.1", port))
        def answered(peer: Peer) -> bool:  # the answer, among the node's own (triggered) checks
            return any(stun.parse_message(d).message_class == stun.Class.RESPONSE for d in peer.got)

        assert await _settle(lambda: answered(a) and answered(b))
        assert mux.by_address[addr_a].receiver is conns[0] and mux.by_address[addr_b].receiver is conns[1]

        # From then on the address is the connection's (and ICE's pair): its media reaches that connection's fast
        # lane only.
        seen: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
        for i, conn in enumerate(conns):
            conn.set_fast(seen[i].append)
        a.transport.sendto(b"\x80\x60" + b"a" * 30, ("127.0.0.1", port))
        b.transport.sendto(b"\x80\x60" + b"b" * 30, ("127.0.0.1", port))
        assert await _settle(lambda: seen[0] and seen[1])
        assert seen[0][0].endswith(b"a" * 30) and seen[1][0].endswith(b"b" * 30) and not seen[2]

        # A closed connection forgets its addresses and ufrag: its peer's packets are strangers again.
        await conns[0].close()
        assert addr_a not in mux.by_address and host.ufrags.get(conns[0].local_username) is None
        a.transport.sendto(b"\x80\x60" + b"late", ("127.0.0.1", port))
        assert await _settle(lambda: mux.dropped == 4)
    finally:
        for peer in (a, b, stranger):
            peer.transport.close()
        for conn in conns[1:]:
            await conn.close()
        for task in checking:
            task.cancel()
        await asyncio.gather(*checking, return_exceptions=True)
        host.close()


async def test_one_connection_owns_a_bounded_number_of_addresses():
    host = await node_ice_host("127.0.0.1", free_port(socket.SOCK_DGRAM), 0, PortRange(41111, 41120, "127.0.0.1"))
    [mux] = host.sources
    conn = host.connection(controlling=False)
    await conn.gather_candidates()
    [share] = [p for p in conn._protocols if isinstance(p, SharedProtocol)]
    for i in range(MAX_ADDRESSES + 10):
        mux.bind(("127.0.0.1", 30000 + i), share)
    assert len(share.addresses) == MAX_ADDRESSES == len(mux.by_address)
    await conn.close()
    assert not mux.by_address and not mux.shares
    host.close()


async def test_udp_port_in_use_is_a_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(OSError, match=f"UDP 127.0.0.1 port {taken.getsockname()[1]}"):
            await node_ice_host("127.0.0.1", taken.getsockname()[1], 0, PortRange(41121, 41130, "127.0.0.1"))


def _udp_ports_of(pid: int) -> set[int]:
    """Local ports of the UDP sockets process `pid` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_fifty_participants_with_media_share_the_one_udp_port(server_factory, room_name):
    udp_port = free_port(socket.SOCK_DGRAM)
    server = server_factory(env={"BRAID_RTC__UDP_PORT": str(udp_port), "BRAID_LOG_LEVEL": "WARNING"})
    client_ports = PortRange(41200, 41399, host="127.0.0.1")
    cert = RTCCertificate.generateCertificate()
    clients = []
    sender = None
    try:
        sender = await start_publisher(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "pub"),
                                       client_ports, cert, 15, 2, clients)
        subscribers = await join_subscribers(
            server.ws_url, room_name, 49, lambda r, i: join_token(server.api_key, server.api_secret, r, i),
            client_ports, cert, clients, wait=30)
        assert len(clients) == 50
        for client in clients:
            assert client.pc.ice_conn._nominated[1].remote_addr == ("127.0.0.1", udp_port), client.identity
        counts = [s.counters.packets for s in subscribers]
        await asyncio.sleep(1.0)
        grown = [s.counters.packets - before for s, before in zip(subscribers, counts)]
        assert all(g > 10 for g in grown), grown  # everyone keeps receiving audio and video
        # The node holds its one media port (and the cluster relay socket), not a socket per participant.
        held = _udp_ports_of(server.proc.pid)
        assert udp_port in held and len(held) <= 2, held
    finally:
        if sender is not None:
            await sender.stop()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    assert "Traceback" not in server.log(), server.log()[-3000:]


async def test_ipv6_candidates_on_the_node_ports():
    """With rtc.node_ip6 the node offers host candidates on its UDP and ICE-TCP ports over IPv6 too, and a peer
    that has only IPv6 connects and moves SRTP through the IPv6 share of the port."""
    from braid.services.media import rtp, sdp
    from braid.services.media.transport import PeerTransport

    udp_port, tcp_port = free_port(socket.SOCK_DGRAM), free_port()
    node = await node_ice_host("127.0.0.1", udp_port, tcp_port, PortRange(41140, 41149, "127.0.0.1"), node_ip6="::1")
    client = IceHost.port_range(PortRange(41150, 41159, host="::1"), "::1")
    cert = RTCCertificate.generateCertificate()
    got: list[bytes] = []
    server = PeerTransport(ice=node, certificate=cert, offerer=False, label="node", on_rtp=got.append,
                           on_rtcp=lambda d: None, on_state=lambda s: None)
    peer = PeerTransport(ice=client, certificate=cert, offerer=True, label="v6-peer", on_rtp=lambda d: None,
                         on_rtcp=lambda d: None, on_state=lambda s: None)
    try:
        await server.prepare()
        await peer.prepare()
        offered = {(c.transport, c.host, c.port) for c in server.ice_conn.local_candidates}
        assert offered == {("udp", "127.0.0.1", udp_port), ("tcp", "127.0.0.1", tcp_port),
                           ("udp", "::1", udp_port), ("tcp", "::1", tcp_port)}

        def description(pc: PeerTransport, setup: str) -> sdp.Session:
            sections = [sdp.Section(kind="video", mid="0", direction="sendrecv", codecs=[sdp.Codec(96, "VP8", 90000)])]
            return sdp.parse(sdp.write(sections, pc.local_transport(setup), 1, 1))

        server.set_remote(description(peer, "actpass"), is_offer=True)
        peer.set_remote(description(server, server.answer_setup), is_offer=False)
        assert await _settle(lambda: server.state == peer.state == "connected", 10)
        assert server.ice_conn._nominated[1].local_candidate.host == "::1"
        for seq in range(5):
            peer.send_rtp(rtp.HEADER.pack(0x80, 96, seq, 0, 77) + b"over-ipv6")
        assert await _settle(lambda: len(got) == 5)
        assert got[0].endswith(b"over-ipv6")
    finally:
        await peer.close()
        await server.close()
        node.close()


async def test_default_ports_give_way_when_taken_but_configured_ones_do_not(tmp_path):
    """A second server on one machine still starts when nobody configured the ports (it takes free ones and says
    so); a configured port that is taken stops start-up with the port named."""
    from braid.shared.config import load_config

    from .servers import start_server

    assert not load_config(dev=True, env={}).is_set("rtc.udp_port")
    assert load_config(dev=True, env={"BRAID_RTC__UDP_PORT": "7882"}).is_set("rtc.udp_port")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp_port, tcp_port = udp.getsockname()[1], tcp.getsockname()[1]
        host = await node_ice_host("127.0.0.1", udp_port, tcp_port, PortRange(41160, 41169, "127.0.0.1"),
                                   busy_fallback=frozenset({"udp", "tcp"}))
        assert host.udp_port not in (0, udp_port) and host.tcp_port not in (0, tcp_port)
        host.close()
        server = start_server(tmp_path, env={"BRAID_RTC__UDP_PORT": str(udp_port)}, wait_ready=False)
        try:
            assert server.proc.wait(90) != 0
            assert f"cannot listen on UDP 127.0.0.1 port {udp_port}" in server.log(), server.log()
        finally:
            server.stop()
