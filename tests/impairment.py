"""A user-space UDP impairment relay (this kernel has no netem): loss, delay, jitter and a bandwidth cap, per
direction and per client flow, changeable while media flows.

The media node listens on `target_host` (rtc.bind_ip) but announces `listen_host` (rtc.node_ip) in its ICE
candidates, so clients send to the relay, which listens on the same ports. The node's own connectivity checks
towards the clients' host candidates would find a direct path around the relay, so `start()` drops, with one
iptables rule scoped to the node's ports, whatever those sockets send anywhere but the relay (needs root, as CI
runs; elsewhere the tests that need it are skipped). Each client address gets its own
upstream socket (the node sees one peer per client, as behind a NAT) and its own impairment, so a test can
degrade one subscriber and leave the publisher alone: `flows_since(mark)` are the flows of clients that joined
after `mark`.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field


@dataclass
class Impairment:
    loss: float = 0.0  # probability that a datagram is dropped
    delay: float = 0.0  # seconds added to every datagram
    jitter: float = 0.0  # extra uniform delay in [0, jitter] seconds (order is kept)
    rate_bps: int = 0  # bandwidth cap; 0: none
    queue_bytes: int = 30_000  # what waits for the cap before datagrams are dropped (drop-tail)


class Pipe:
    """One direction of one flow."""

    def __init__(self, send, rng: random.Random) -> None:
        self.send = send
        self.profile = Impairment()
        self.rng = rng
        self.passed = self.dropped = self.bytes = 0
        self._busy_until = 0.0
        self._last_departure = 0.0
        self.closed = False  # the relay closed: what is still queued is dropped, not sent on a closed socket

    def backlog(self) -> float:
        """Seconds of datagrams waiting for the bandwidth cap."""
        return max(0.0, self._busy_until - asyncio.get_running_loop().time())

    def push(self, data: bytes) -> None:
        p = self.profile
        if p.loss and self.rng.random() < p.loss:
            self.dropped += 1
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        departure = now
        if p.rate_bps:
            start = max(now, self._busy_until)
            if (start - now) * p.rate_bps / 8 > p.queue_bytes:
                self.dropped += 1
                return
            self._busy_until = departure = start + len(data) * 8 / p.rate_bps
        departure += p.delay + (self.rng.uniform(0, p.jitter) if p.jitter else 0.0)
        departure = max(departure, self._last_departure)
        self._last_departure = departure
        self.passed += 1
        self.bytes += len(data)
        if departure <= now:
            self.send(data)
        else:
            loop.call_at(departure, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if not self.closed:
            self.send(data)


@dataclass
class Flow:
    port: int
    client: tuple[str, int]
    created: float
    up: Pipe  # client → node
    down: Pipe  # node → client
    transport: asyncio.DatagramTransport | None = None

    def impair(self, up: Impairment | None = None, down: Impairment | None = None) -> None:
        self.up.profile = up or Impairment()
        self.down.profile = down or Impairment()


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpImpairmentRelay, port: int) -> None:
        self.relay, self.port = relay, port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.relay._from_client(self, data, addr)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def datagram_received(self, data: bytes, addr) -> None:
        self.flow.down.push(data)


@dataclass
class UdpImpairmentRelay:
    listen_host: str
    target_host: str
    ports: range
    seed: int = 1
    flows: dict[tuple[int, tuple[str, int]], Flow] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._listeners: list[_Listener] = []
        self._pending: dict[tuple[int, tuple[str, int]], list[bytes]] = {}

    def _rule(self) -> list[str]:
        return ["OUTPUT", "-p", "udp", "-s", self.target_host, "--sport", f"{self.ports.start}:{self.ports.stop - 1}",
                "!", "-d", self.target_host, "-j", "DROP"]

    async def start(self) -> UdpImpairmentRelay:
        subprocess.run(["iptables", "-w", "-I", *self._rule()], check=True, capture_output=True)
        self._isolated = True
        loop = asyncio.get_running_loop()
        for port in self.ports:
            _, listener = await loop.create_datagram_endpoint(lambda port=port: _Listener(self, port),
                                                              local_addr=(self.listen_host, port))
            self._listeners.append(listener)
        return self

    def mark(self) -> float:
        return time.monotonic()

    def flows_since(self, mark: float) -> list[Flow]:
        return [f for f in self.flows.values() if f.created >= mark]

    def _from_client(self, listener: _Listener, data: bytes, addr) -> None:
        key = (listener.port, addr)
        flow = self.flows.get(key)
        if flow is None:
            if key in self._pending:
                self._pending[key].append(data)
                return
            self._pending[key] = [data]
            asyncio.get_running_loop().create_task(self._open(listener, key))
            return
        flow.up.push(data)

    async def _open(self, listener: _Listener, key) -> None:
        port, client = key
        loop = asyncio.get_running_loop()
        flow = Flow(port, client, time.monotonic(), up=Pipe(lambda d: None, self._rng),
                    down=Pipe(lambda d: listener.transport.sendto(d, client), self._rng))
        transport, _ = await loop.create_datagram_endpoint(lambda: _Upstream(flow), local_addr=(self.target_host, 0),
                                                           remote_addr=(self.target_host, port))
        flow.transport = transport
        flow.up.send = transport.sendto
        self.flows[key] = flow
        for data in self._pending.pop(key, []):
            flow.up.push(data)

    def close(self) -> None:
        if getattr(self, "_isolated", False):
            subprocess.run(["iptables", "-w", "-D", *self._rule()], capture_output=True)
            self._isolated = False
        for listener in self._listeners:
            if listener.transport is not None:
                listener.transport.close()
        for flow in self.flows.values():
            flow.up.closed = flow.down.closed = True
            if flow.transport is not None:
                flow.transport.close()
        self.flows.clear()


RELAY_IP = "127.0.0.2"  # what a media node behind the relay announces; it listens on 127.0.0.1


def free_port_block(count: int, hosts=("127.0.0.1", RELAY_IP)) -> range:
    """`count` consecutive UDP ports free on every one of `hosts`."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randint(32000, 32700 - count)  # beside free_port's range, below the ephemeral one
        socks = []
        try:
            for port in range(start, start + count):
                for host in hosts:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(sock)
                    sock.bind((host, port))
            return range(start, start + count)
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free UDP port block")


def behind_relay_env(ports: range) -> dict[str, str]:
    """Media node settings that put it behind a relay listening on RELAY_IP and `ports`."""
    return {"BRAID_RTC__NODE_IP": RELAY_IP, "BRAID_RTC__BIND_IP": "127.0.0.1", "BRAID_RTC__UDP_PORT": "0",
            "BRAID_RTC__TCP_PORT": "0",  # a socket per participant from the range, and no ICE-TCP around the relay
            "BRAID_RTC__PORT_RANGE_START": str(ports.start), "BRAID_RTC__PORT_RANGE_END": str(ports.stop - 1)}


def can_isolate() -> bool:
    """Whether this process may add the iptables rule that keeps a media node behind the relay."""
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return False
    return subprocess.run(["iptables", "-w", "-L", "OUTPUT", "-n"], capture_output=True).returncode == 0
