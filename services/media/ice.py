"""ICE for the media node: host candidates announcing the node IP, from an `IceHost` (the node's one shared UDP
port and TCP port, see icemux.py, or one UDP socket per PeerConnection from a port range), with a fast lane that
hands SRTP/SRTCP datagrams straight to the forwarding path.

aioice seams used (aioice 0.13, pinned by `tests/test_media_seams.py`):
* `Connection.gather_candidates` / `get_component_candidates` are overridden so no interface enumeration or
  ephemeral ports are involved;
* `Connection._protocols`, `_local_candidates`, `_local_candidates_start`, `_local_candidates_end` are set the way
  aioice's own gatherer sets them; a protocol may join `_protocols` later (an ICE-TCP connection that arrives);
* `StunProtocol.datagram_received` is overridden: bytes 128-191 (RTP/RTCP, RFC 7983) skip STUN parsing and the
  connection's queue once the DTLS-SRTP keys exist; everything else goes the stock way (STUN, DTLS).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from aioice.candidate import Candidate, candidate_foundation, candidate_priority
from aioice.ice import Connection, StunProtocol
from aioice.utils import random_string

log = logging.getLogger(__name__)

SOCKET_BUFFER = 1 << 20


class PortRange:
    """Hands out UDP ports of [start, end] round-robin; a port in use is skipped."""

    def __init__(self, start: int, end: int, host: str, open_endpoint: Callable | None = None):
        """`open_endpoint(factory, local_addr=...)` opens a socket, by default `loop.create_datagram_endpoint`
        (the media node passes fastpath's burst-reading one)."""
        if not 0 < start <= end < 65536:
            raise ValueError(f"invalid port range {start}-{end}")
        self.start, self.end = start, end
        self.host = host
        self._open_endpoint = open_endpoint
        self._next = random.randint(start, end)
        self._bind_host: str | None = None

    def __len__(self) -> int:
        return self.end - self.start + 1

    async def bind(self, factory: Callable[[], asyncio.DatagramProtocol]):
        """(transport, protocol, port) on the first free port; OSError if the range is exhausted."""
        open_endpoint = self._open_endpoint or asyncio.get_running_loop().create_datagram_endpoint
        last_error: OSError | None = None
        for _ in range(len(self)):
            port = self._next
            self._next = self.start if port >= self.end else port + 1
            try:
                transport, protocol = await open_endpoint(factory, local_addr=(self._bind_address(), port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL and self._bind_host is None:
                    # The node IP is not on this host (1:1 NAT): listen everywhere, announce the node IP.
                    self._bind_host = "0.0.0.0"
                    continue
                last_error = exc
                continue
            sock = transport.get_extra_info("socket")
            if sock is not None:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                    except OSError:
                        pass
            return transport, protocol, port
        raise OSError(errno.EADDRINUSE, f"no free UDP port in {self.start}-{self.end}: {last_error}")

    def _bind_address(self) -> str:
        return self._bind_host or self.host


class CandidateSource(Protocol):
    """Gives a connection its host candidates (and the sockets behind them)."""

    async def attach(self, conn: "NodeIceConnection") -> list[Candidate]: ...


class UfragTable:
    """Local ICE username fragment → connection, for sockets that carry many connections (demultiplexed by the
    USERNAME of the first STUN check from an address)."""

    def __init__(self) -> None:
        self._conns: dict[str, NodeIceConnection] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def claim(self, conn: "NodeIceConnection") -> str:
        """A fresh ufrag registered for `conn`."""
        while True:
            ufrag = random_string(UFRAG_LENGTH)
            if ufrag not in self._conns:
                self._conns[ufrag] = conn
                return ufrag

    def release(self, ufrag: str) -> None:
        self._conns.pop(ufrag, None)

    def get(self, ufrag: str) -> "NodeIceConnection | None":
        return self._conns.get(ufrag)


UFRAG_LENGTH = 16  # many connections share one port: long enough that random ufrags never collide in practice


class OwnSocket:
    """A UDP socket of its own for each connection, from a port range (rtc.udp_port 0)."""

    def __init__(self, ports: PortRange, announce_ip: str):
        self.ports = ports
        self.announce_ip = announce_ip

    async def attach(self, conn: "NodeIceConnection") -> list[Candidate]:
        kind = MediaProtocol6 if ":" in self.ports.host else MediaProtocol
        _, protocol, port = await self.ports.bind(lambda: kind(conn))
        protocol.local_candidate = host_candidate(self.announce_ip, port)
        conn.add_protocol(protocol)
        return [protocol.local_candidate]


def host_candidate(ip: str, port: int, transport: str = "udp") -> Candidate:
    tcp = transport == "tcp"
    return Candidate(
        foundation=candidate_foundation("host", transport, ip),
        component=1,
        transport=transport,
        # UDP first; passive TCP below it (RFC 6544 section 4.2), IPv6 above IPv4 as browsers rank them.
        priority=candidate_priority(1, "host", local_pref=(40000 if tcp else 65535) - (0 if ":" in ip else 10)),
        host=ip,
        port=port,
        type="host",
        tcptype="passive" if tcp else None,
    )


@dataclass
class IceHost:
    """Where the node's ICE connections get their host candidates from; `ufrags` routes shared sockets."""

    sources: list[CandidateSource]
    ufrags: UfragTable | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)
    udp_port: int = 0  # the shared ports, once bound (0: none)
    tcp_port: int = 0

    @classmethod
    def port_range(cls, ports: PortRange, announce_ip: str) -> "IceHost":
        return cls([OwnSocket(ports, announce_ip)])

    def connection(self, controlling: bool) -> "NodeIceConnection":
        return NodeIceConnection(self, controlling=controlling)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers.clear()


class MediaProtocol(StunProtocol):
    """aioice's STUN protocol with a lane for media: `fast(data)` gets every RTP/RTCP datagram once set.

    Anyone may send STUN (that is how ICE checks arrive), but DTLS and SRTP (RFC 7983: first byte above 3) are
    taken only from a peer address ICE paired with: a stranger's datagrams never reach DTLS or the media path,
    and never count as the participant's activity. Malformed STUN is dropped, never raised into the loop.
    """

    fast: Callable[[bytes], None] | None = None
    last_rx: float = 0.0
    _peer_pair = None
    _peer_addr: tuple | None = None

    def datagram_received(self, data: bytes | str, addr) -> None:  # type: ignore[override]
        if not data:
            return  # an empty datagram would end aiortc's DTLS transport
        if self._is_peer(addr):
            self.last_rx = time.monotonic()
        elif data[0] > 3:
            return
        fast = self.fast
        if fast is not None and 127 < data[0] < 192:
            fast(data)  # type: ignore[arg-type]
            return
        try:
            super().datagram_received(data, addr)
        except Exception as exc:  # aioice's STUN parser raises more than ValueError on hostile input
            log.debug("dropped a malformed datagram from %s: %r", addr, exc)

    def _is_peer(self, addr) -> bool:
        pair = self.receiver._nominated.get(1)
        if pair is not self._peer_pair:
            self._peer_pair, self._peer_addr = pair, (pair.remote_addr if pair is not None else None)
        if addr == self._peer_addr:
            return True
        # Before (or between) nominations: any pair ICE is checking. Its remote addresses came from signalling
        # (bounded by the candidate limit) or from authenticated checks (peer-reflexive).
        return any(p.protocol is self and p.remote_addr == addr for p in self.receiver._check_list)


class MediaProtocol6(MediaProtocol):
    """An IPv6 socket of its own: the kernel's addresses are 4-tuples, the connection's pairs 2-tuples."""

    def datagram_received(self, data: bytes | str, addr) -> None:  # type: ignore[override]
        super().datagram_received(data, (addr[0], addr[1]))


class NodeIceConnection(Connection):
    """A controlled (or controlling) full ICE agent whose host candidates come from the node's `IceHost`."""

    def __init__(self, host: IceHost, *, controlling: bool = False):
        self._ufrags = host.ufrags
        local_username = host.ufrags.claim(self) if host.ufrags is not None else None
        super().__init__(ice_controlling=controlling, components=1, use_ipv6=False, local_username=local_username)
        self._host = host
        self.fast: Callable[[bytes], None] | None = None
        self.on_close: list[Callable[[], object]] = []  # the shared sockets forget this connection

    def add_protocol(self, protocol: "MediaProtocol") -> None:
        """A socket (or ICE-TCP connection) carrying this connection; it gets the fast lane if that is armed."""
        protocol.fast = self.fast
        self._protocols.append(protocol)

    def set_fast(self, fast: Callable[[bytes], None] | None) -> None:
        """Arm (or disarm) the media fast lane on every protocol, and on those added later."""
        self.fast = fast
        for protocol in self._protocols:
            protocol.fast = fast  # type: ignore[attr-defined]

    @property
    def last_rx(self) -> float:
        return max((getattr(p, "last_rx", 0.0) for p in self._protocols), default=0.0)

    async def gather_candidates(self) -> None:
        if self._local_candidates_start:
            return
        self._local_candidates_start = True
        self._local_candidates += await self.get_component_candidates(1, [])
        self._local_candidates_end = True

    async def get_component_candidates(self, component: int, addresses: list[str], timeout: int = 5):
        candidates: list[Candidate] = []
        for source in self._host.sources:
            candidates += await source.attach(self)
        return candidates

    async def close(self) -> None:
        if self._ufrags is not None:
            for ufrag in (self._local_username, *(creds[0] for creds in self._previous_local)):
                self._ufrags.release(ufrag)
        for forget in self.on_close:
            forget()
        self.on_close.clear()
        await super().close()

    # --- ICE restart ---------------------------------------------------------------------------------------
    #
    # aioice cannot restart ICE, but what a restart needs here is small: new credentials on one or both sides,
    # and checks (from the peer's new sockets, or its old ones) against our unchanged host candidate. The socket
    # stays; aioice pairs, checks and nominates as usual, and a newly nominated pair replaces `_nominated`,
    # which the send path reads per packet. DTLS and SCTP never notice.
    # * The peer restarts (its offer, or its answer to ours, brings new credentials): `restart_remote`. They are
    #   adopted when the peer first checks with them, so until then consent checks keep the old ones.
    # * We restart (our offer on the v0 subscriber PC): `restart_local` draws new credentials for the offer.
    # Until the peer prunes its previous generation, checks using the previous credentials are still answered.

    on_pair_change: Callable[[], None] | None = None  # the nominated pair was replaced (the send path rebinds)
    _pending_remote: tuple[str, str] | None = None
    _previous_remote_username: str | None = None
    _previous_local: tuple[tuple[str, str], ...] = ()  # newest first; an unanswered restart keeps the older ones
    _restarting = False  # a restart began and the nominated pair has not moved since

    def restart_remote(self, username: str, password: str) -> None:
        """The peer restarted ICE with new credentials; take them once its checks use them."""
        if username == self.remote_username:
            return
        self._pending_remote = (username, password)
        self._remote_candidates_end = False  # the new generation trickles its own candidates
        self._restarting = True

    def restart_local(self) -> None:
        """New local credentials for an ICE-restart offer."""
        generations = ((self._local_username, self._local_password), *self._previous_local)
        self._restarting = True
        self._previous_local = generations[:3]
        if self._ufrags is not None:
            for dropped, _ in generations[3:]:
                self._ufrags.release(dropped)
            self._local_username = self._ufrags.claim(self)
        else:
            self._local_username = random_string(4)
        self._local_password = random_string(22)

    def request_received(self, message, addr, protocol) -> None:  # type: ignore[override]
        username = message.attributes.get("USERNAME")
        local, _, remote = username.partition(":") if isinstance(username, str) else ("", "", "")
        pending = self._pending_remote
        if pending is not None and remote == pending[0]:
            self._previous_remote_username = self.remote_username
            self.remote_username, self.remote_password = pending
            self._pending_remote = None
        previous = next((creds for creds in self._previous_local if creds[0] == local), None)
        if previous is not None and local != self._local_username:
            # A check of the previous generation: authenticate and answer it with the previous credentials.
            current = self._local_username, self._local_password
            self._local_username, self._local_password = previous
            try:
                super().request_received(message, addr, protocol)
            finally:
                self._local_username, self._local_password = current
            return
        super().request_received(message, addr, protocol)

    def check_complete(self, pair) -> None:  # type: ignore[override]
        before = self._nominated.get(pair.component)
        super().check_complete(pair)
        after = self._nominated.get(pair.component)
        if before is not None and after is not before:
            # Once per restart; the peer may then nominate better pairs of the new generation as they succeed.
            what = "ICE restart completed" if self._restarting else "nominated pair changed"
            self._restarting = False
            log.info("%s: media moves to %s -> %s", what, after.local_addr, after.remote_addr)
            if self.on_pair_change is not None:
                self.on_pair_change()

    def _valid_username(self, username: str) -> bool:
        if super()._valid_username(username):
            return True
        local, colon, remote = username.partition(":")
        return colon == ":" and local == self.local_username and bool(remote) and remote in (
            self._previous_remote_username, (self._pending_remote or ("",))[0])

    def selected(self):
        """(datagram transport, remote address) of the nominated pair, or None before ICE completes."""
        pair = self._nominated.get(1)
        if pair is None:
            return None
        return pair.protocol.transport, pair.remote_addr
