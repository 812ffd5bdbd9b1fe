"""One UDP port and one TCP port per media node, shared by the ICE connections of every participant.

The UDP socket demultiplexes by remote address: one dict lookup per datagram hands it to the connection's
`MediaProtocol`, so media costs what it costs on a socket of its own. An address no one owns yet is only
accepted for a STUN message: a check is routed by the local ufrag in its USERNAME (`UfragTable`), a response by
the transaction it answers. An address becomes a connection's once it answered a check from there (only
authenticated checks are answered) or got a response to its own check there.

The TCP port takes ICE-TCP (RFC 6544): the node's candidates are passive, so clients connect to it, and each TCP
connection, framed as RFC 4571 says (a 2-byte length before every packet), is routed by the ufrag of its first
STUN check and then belongs to that ICE connection as one more of its sockets.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
from typing import Any, Callable

from aioice import stun
from aioice.candidate import Candidate

from .ice import SOCKET_BUFFER, IceHost, MediaProtocol, NodeIceConnection, OwnSocket, PortRange, UfragTable, host_candidate

log = logging.getLogger(__name__)


def _parse_stun(data: bytes) -> stun.Message | None:
    """A stranger's STUN message, or None: aioice raises struct.error (not ValueError) on short attributes."""
    try:
        return stun.parse_message(data)
    except (ValueError, struct.error, IndexError):
        return None

Address = tuple[Any, ...]

MAX_ADDRESSES = 16  # remote addresses one connection may own on the shared UDP socket
MAX_TCP_PER_CONNECTION = 4
MAX_PENDING_TCP = 256  # TCP connections not yet identified by a valid first check
TCP_IDENTIFY_TIMEOUT = 10.0
TCP_WRITE_LIMIT = 1 << 20  # bytes queued on one ICE-TCP connection before packets are dropped (like UDP loss)


def _local_ufrag(message: stun.Message) -> str:
    username = message.attributes.get("USERNAME")
    return username.partition(":")[0] if isinstance(username, str) else ""


class SharedProtocol(MediaProtocol):
    """One connection's share of a shared socket: sends on it directly, receives what the mux routes here."""

    def __init__(self, conn: NodeIceConnection, mux: "UdpMux"):
        super().__init__(conn)
        self.mux = mux
        self.addresses: list[Address] = []
        self.transport = mux.transport  # type: ignore[assignment]

    def send_stun(self, message: stun.Message, addr: Address) -> None:
        if message.message_class == stun.Class.RESPONSE:
            self.mux.bind(addr, self)  # answered a check from there: it authenticated with our credentials
        super().send_stun(message, addr)

    async def request(self, request: stun.Message, addr, integrity_key=None, retransmissions=None):
        self.mux.transactions[request.transaction_id] = self
        try:
            return await super().request(request, addr, integrity_key, retransmissions)
        finally:
            self.mux.transactions.pop(request.transaction_id, None)

    def dispatch(self, message: stun.Message, addr: Address) -> None:
        """A STUN message the mux already parsed (the same steps as `StunProtocol.datagram_received`)."""
        if message.message_class in (stun.Class.RESPONSE, stun.Class.ERROR):
            transaction = self.transactions.get(message.transaction_id)
            if transaction is not None:
                transaction.response_received(message, addr)
        elif message.message_class == stun.Class.REQUEST:
            self.receiver.request_received(message, addr, self)

    async def close(self) -> None:
        self.mux.detach(self)
        self.connection_lost(None)


class UdpMux(asyncio.DatagramProtocol):
    """The node's UDP port (rtc.udp_port). `attach` gives a connection its share and host candidate."""

    def __init__(self, ufrags: UfragTable, announce_ip: str):
        self.ufrags = ufrags
        self.announce_ip = announce_ip
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.by_address: dict[Address, SharedProtocol] = {}
        self.transactions: dict[bytes, SharedProtocol] = {}
        self.shares: dict[NodeIceConnection, SharedProtocol] = {}
        self.dropped = 0

    async def listen(self, host: str, port: int, open_endpoint: Callable | None = None) -> None:
        """Bind (host, port); `open_endpoint(factory, local_addr=..., family=...)` opens the socket, by default
        `loop.create_datagram_endpoint` (the media node passes fastpath's burst-reading one)."""
        open_endpoint = open_endpoint or asyncio.get_running_loop().create_datagram_endpoint
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            await open_endpoint(lambda: self, local_addr=(host, port), family=family)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on UDP {host} port {port}: {exc.strerror}") from None
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 8 * SOCKET_BUFFER)
            except OSError:
                pass
        self.port = self.transport.get_extra_info("sockname")[1]

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def attach(self, conn: NodeIceConnection) -> list[Candidate]:
        share = SharedProtocol(conn, self)
        share.local_candidate = host_candidate(self.announce_ip, self.port)
        self.shares[conn] = share
        conn.add_protocol(share)
        return [share.local_candidate]

    def detach(self, share: SharedProtocol) -> None:
        for addr in share.addresses:
            if self.by_address.get(addr) is share:
                del self.by_address[addr]
        share.addresses.clear()
        if self.shares.get(share.receiver) is share:  # type: ignore[arg-type]
            del self.shares[share.receiver]  # type: ignore[arg-type]

    def bind(self, addr: Address, share: SharedProtocol) -> None:
        addr = (addr[0], addr[1])
        owner = self.by_address.get(addr)
        if owner is share:
            return
        if len(share.addresses) >= MAX_ADDRESSES:
            return
        if owner is not None:  # the address moved to another connection (a port reused by a new client)
            owner.addresses.remove(addr)
        self.by_address[addr] = share
        share.addresses.append(addr)

    # --- receiving ------------------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        share = self.by_address.get(addr)
        if share is not None:
            share.datagram_received(data, addr)
            return
        self._from_stranger(data, (addr[0], addr[1]))

    def _from_stranger(self, data: bytes, addr: Address) -> None:
        if len(data) < 20 or data[0] > 1:  # only STUN (RFC 7983: first byte 0-3; requests and responses 0-1)
            self.dropped += 1
            return
        message = _parse_stun(data)
        if message is None:
            self.dropped += 1
            return
        share: SharedProtocol | None
        if message.message_class == stun.Class.REQUEST:
            conn = self.ufrags.get(_local_ufrag(message))
            share = self.shares.get(conn) if conn is not None else None
        else:
            share = self.transactions.get(message.transaction_id)
            if share is not None and message.message_class == stun.Class.RESPONSE:
                self.bind(addr, share)
        if share is None:
            self.dropped += 1
            return
        share.dispatch(message, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors of one peer must not affect the others
        pass


class UdpMux6(UdpMux):
    """The IPv6 UDP port: the kernel's addresses are 4-tuples, the connections' 2-tuples."""

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        addr = (addr[0], addr[1])
        share = self.by_address.get(addr)
        if share is not None:
            share.datagram_received(data, addr)
            return
        self._from_stranger(data, addr)


# --- ICE-TCP ---------------------------------------------------------------------------------------------------


class FramedWriter:
    """`sendto` for an ICE-TCP connection: every packet goes out with its RFC 4571 length."""

    def __init__(self, transport: asyncio.Transport):
        self.tcp = transport

    def sendto(self, data: bytes, addr: Address | None = None) -> None:
        if self.tcp.is_closing() or self.tcp.get_write_buffer_size() > TCP_WRITE_LIMIT:
            return
        self.tcp.write(len(data).to_bytes(2, "big") + data)

    def close(self) -> None:
        self.tcp.close()

    def get_extra_info(self, name: str, default=None):
        if name == "socket":
            return default  # not a datagram socket: the compiled send path must not write to it unframed
        return self.tcp.get_extra_info(name, default)


class TcpProtocol(MediaProtocol):
    """One ICE-TCP connection of an ICE connection."""

    def __init__(self, conn: NodeIceConnection, writer: FramedWriter, local: Candidate):
        super().__init__(conn)
        self.transport = writer  # type: ignore[assignment]
        self.local_candidate = local

    async def close(self) -> None:
        self.transport.close()
        self.connection_lost(None)


class IceTcpStream(asyncio.Protocol):
    """A TCP connection to the node's ICE-TCP port: RFC 4571 frames; identified by its first STUN check."""

    def __init__(self, mux: "TcpMux"):
        self.mux = mux
        self.buffer = bytearray()
        self.peer: Address = ("", 0)
        self.protocol: TcpProtocol | None = None
        self.tcp: asyncio.Transport | None = None
        self._identify_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.tcp = transport
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        if len(self.mux.pending) >= MAX_PENDING_TCP:
            transport.close()
            return
        self.mux.pending.add(self)
        self._identify_timer = asyncio.get_running_loop().call_later(TCP_IDENTIFY_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 2:
            size = (buffer[0] << 8) | buffer[1]
            if len(buffer) < 2 + size:
                return
            frame = bytes(buffer[2:2 + size])
            del buffer[:2 + size]
            if self.protocol is not None:
                self.protocol.datagram_received(frame, self.peer)
            elif not self._identify(frame):
                assert self.tcp is not None
                self.tcp.close()
                buffer.clear()
                return

    def _identify(self, frame: bytes) -> bool:
        message = _parse_stun(frame)
        if message is None:
            return False
        if message.message_class != stun.Class.REQUEST:
            return False
        conn = self.mux.ufrags.get(_local_ufrag(message))
        if conn is None or conn not in self.mux.candidates:
            return False
        if sum(isinstance(p, TcpProtocol) for p in conn._protocols) >= MAX_TCP_PER_CONNECTION:
            return False
        assert self.tcp is not None
        self._stop_waiting()
        self.protocol = TcpProtocol(conn, FramedWriter(self.tcp), self.mux.candidates[conn])
        conn.add_protocol(self.protocol)
        self.protocol.datagram_received(frame, self.peer)
        return True

    def _stop_waiting(self) -> None:
        self.mux.pending.discard(self)
        if self._identify_timer is not None:
            self._identify_timer.cancel()
            self._identify_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        protocol = self.protocol
        if protocol is not None:
            protocol.connection_lost(exc)
            conn = protocol.receiver
            if protocol in conn._protocols and not any(
                    pair.protocol is protocol for pair in conn._nominated.values()):
                conn._protocols.remove(protocol)


class TcpMux:
    """The node's ICE-TCP port (rtc.tcp_port): one passive TCP candidate for every connection."""

    def __init__(self, ufrags: UfragTable, announce_ip: str):
        self.ufrags = ufrags
        self.announce_ip = announce_ip
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pending: set[IceTcpStream] = set()
        self.candidates: dict[NodeIceConnection, Candidate] = {}

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(lambda: IceTcpStream(self), host, port, reuse_address=True)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on TCP {host} port {port}: {exc.strerror}") from None
        self.port = self.server.sockets[0].getsockname()[1]

    async def attach(self, conn: NodeIceConnection) -> list[Candidate]:
        candidate = host_candidate(self.announce_ip, self.port, "tcp")
        self.candidates[conn] = candidate
        conn.on_close.append(lambda: self.candidates.pop(conn, None))
        return [candidate]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


# --- the node's sockets ----------------------------------------------------------------------------------------


async def node_ice_host(node_ip: str, udp_port: int, tcp_port: int, ports: PortRange, node_ip6: str = "", *,
                        bind_ip: str = "", busy_fallback: frozenset[str] = frozenset(),
                        open_endpoint: Callable | None = None) -> IceHost:
    """The media node's ICE sockets: its UDP port (or, with udp_port 0, a socket per connection from `ports`),
    its ICE-TCP port (tcp_port 0: none), and both again on `node_ip6` when the node has an IPv6 address.
    A port named in `busy_fallback` ("udp", "tcp") that is already in use is replaced by a free one, with a
    warning (for ports nobody configured: a second server on one machine); otherwise that is an error.
    `bind_ip` is where the IPv4 sockets listen when it is not `node_ip` (1:1 NAT); `open_endpoint` opens UDP
    sockets (see `UdpMux.listen`)."""
    ufrags = UfragTable()
    host = IceHost([], ufrags)
    try:
        for ip in (node_ip, node_ip6):
            if not ip:
                continue
            bind = bind_ip if bind_ip and ip == node_ip else _bindable(ip)
            if udp_port:
                udp = (UdpMux6 if ":" in ip else UdpMux)(ufrags, ip)
                await _listen(udp, bind, udp_port, "udp" in busy_fallback, open_endpoint)
                udp_port = host.udp_port = udp.port  # the IPv6 socket takes the same port
                host.sources.append(udp)
                host.closers.append(udp.close)
            elif ip == node_ip:
                host.sources.append(OwnSocket(ports, ip))
            if tcp_port:
                tcp = TcpMux(ufrags, ip)
                await _listen(tcp, bind, tcp_port, "tcp" in busy_fallback, None)
                tcp_port = host.tcp_port = tcp.port
                host.sources.append(tcp)
                host.closers.append(tcp.close)
    except BaseException:
        host.close()
        raise
    return host


async def _listen(mux: "UdpMux | TcpMux", host: str, port: int, busy_fallback: bool,
                  open_endpoint: Callable | None) -> None:
    extra = {"open_endpoint": open_endpoint} if open_endpoint is not None else {}
    try:
        await mux.listen(host, port, **extra)
    except OSError as exc:
        if not busy_fallback or exc.errno != errno.EADDRINUSE:
            raise
        await mux.listen(host, 0, **extra)
        kind = "udp" if isinstance(mux, UdpMux) else "tcp"
        log.warning("%s port %d is in use: listening on %d instead (set rtc.%s_port to choose one)", kind.upper(),
                    port, mux.port, kind)


def _bindable(ip: str) -> str:
    """`ip` if it is an address of this host, else the wildcard of its family (1:1 NAT: announce, listen on all)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"
    return ip


def detect_ipv6() -> str:
    """The first global IPv6 address of this host's interfaces, or ""."""
    import ifaddr  # aioice's own dependency

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):
                address = ipaddress.IPv6Address(ip.ip[0])
                if not (address.is_loopback or address.is_link_local or address.is_multicast):
                    return str(address)
    return ""
