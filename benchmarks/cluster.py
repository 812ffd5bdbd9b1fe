"""Cross-node figures for `make bench`: what it costs when a room spans media nodes.

1. **Relay path** (in one process, uvloop, loopback UDP): a publisher's packets enter an up-track on the origin,
   cross the SRTP relay once and feed the relayed up-track on the subscribing node. Reports CPU microseconds per
   relayed packet for both ends together (RTP rewrite + protect + sendto, recvfrom + unprotect + parse + fan-out
   to one local subscriber stub), at a moderate rate (packets paced like real media) and flat out.
2. **Relay bytes by quality** (same in-process path): a 720p simulcast publisher at livekit-client's default layer
   bitrates (q 180p 160 kb/s, h 360p 450 kb/s, f 720p 1.7 Mb/s) and a subscribing node whose viewer wants LOW,
   then HIGH: the bytes per second the origin's relay socket sends, since only the watched layer crosses.
3. **Cluster** (real processes: redis-server, a router, 2 signal and 2 media nodes in 2 regions): a publisher on
   one media node (audio + video, synthetic RTP), N subscribers on the other, so every packet crosses the relay
   once. Reports join latency through the cluster (WebSocket open → JoinResponse, through signal → router →
   media, and → first media packet), delivered packet rate, and each media node's CPU per packet; then
   `--concurrent-joins` subscribers (100) join one room at the same moment: join and first-media p50/p99.

    python -m benchmarks.cluster [--subscribers 1,10] [--duration 10] [--concurrent-joins 100] [--skip-cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .procs import ROOT, Proc, free_port, run

KEY, SECRET = "benchkey", "a-benchmark-secret-that-is-long-enough"


# --- 1. the relay path in one process --------------------------------------------------------------------------


class RelayPair:
    """Two relay endpoints on loopback joined by one link (origin → subscribing node), as two nodes have."""

    async def open(self):
        from braid.services.media.cluster.relay import InboundLink, OutboundLink, RelayEndpoint, new_key
        from braid.services.media.ice import PortRange

        ports = PortRange(46000, 46099, host="127.0.0.1")
        self.origin_ep, self.sub_ep = RelayEndpoint(), RelayEndpoint()
        await self.origin_ep.open(ports, "127.0.0.1")
        await self.sub_ep.open(ports, "127.0.0.1")
        key_down, key_up = new_key(), new_key()
        self.out = OutboundLink(self.origin_ep, "b", ("127.0.0.1", self.sub_ep.port), key_down, key_up,
                                on_layers=lambda s: None)
        self.origin_ep.add_outbound(self.out)
        self.inbound = InboundLink(self.sub_ep, "a", key_down, key_up)
        self.inbound.addr = ("127.0.0.1", self.origin_ep.port)
        self.sub_ep.add_inbound(self.inbound)
        return self

    def relayed_copy(self, sink, subscriber):
        """The subscribing node's up-track for `sink`'s track, each layer fanned out to `subscriber`."""
        from braid.services.media.forward import UpTrack

        noop = lambda *a: None  # noqa: E731
        relayed = UpTrack("TR_a", "video", "video/VP8", 90000, 96, None, request_keyframe=noop, request_nack=noop)
        for rid, _, ssrc in sink.layers():
            self.inbound.by_ssrc[ssrc] = (relayed, relayed.add_layer(ssrc, rid))
        for layer in relayed.layers:
            layer.subs = [subscriber]
        return relayed

    def close(self) -> None:
        self.out.close()
        self.inbound.close()
        self.origin_ep.close()
        self.sub_ep.close()


def _origin_track(rids: list[str]):
    from braid.services.media.forward import UpTrack

    noop = lambda *a: None  # noqa: E731
    up = UpTrack("TR_a", "video", "video/VP8", 90000, 96, None, request_keyframe=noop, request_nack=noop)
    up.expected_rids = rids
    return up, [up.add_layer(1111 + i, rid) for i, rid in enumerate(rids)]


async def relay_path(packets: int, rate: float | None) -> dict:
    from braid.services.media import rtp

    class Sub:  # a local subscriber's DownTrack, reduced to counting
        count = 0

        def write(self, *args) -> None:
            Sub.count += 1

    pair = await RelayPair().open()
    origin, (layer,) = _origin_track([""])
    pair.relayed_copy(pair.out.attach(origin, "TR_a"), Sub())
    payload = bytes(1100)
    batch = 10 if rate else 64
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        for i in range(0, packets, batch):
            for seq in range(i, i + batch):
                data = rtp.HEADER.pack(0x80, 96, seq & 0xFFFF, seq * 3000, 1111) + payload
                origin.on_packet(layer, data, rtp.parse(data))
            if rate:
                await asyncio.sleep(batch / rate)
            else:  # closed loop: a window of packets in flight, so no socket buffer overflows
                give_up = time.monotonic() + 1.0
                while Sub.count < i + batch // 2 and time.monotonic() < give_up:
                    await asyncio.sleep(0)
        deadline = time.monotonic() + 2
        while Sub.count < packets and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        cpu, elapsed = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        pair.close()
    return {"packets": packets, "delivered": Sub.count, "pps": Sub.count / elapsed,
            "us_per_packet": 1e6 * cpu / max(1, Sub.count), "cpu_pct": 100 * cpu / elapsed}


LAYER_BITRATES = (("q", 160_000), ("h", 450_000), ("f", 1_700_000))  # livekit-client's 720p simulcast defaults


async def relay_by_quality(seconds: float) -> dict[str, float]:
    """Relay bytes/s from the origin for a subscribing node whose viewer wants LOW, then HIGH."""
    from braid.services.media import rtp

    class Viewer:
        def write(self, *args) -> None:
            pass

    pair = await RelayPair().open()
    up, layers = _origin_track([rid for rid, _ in LAYER_BITRATES])
    sink = pair.out.attach(up, "TR_a", wants=(0,))
    pair.relayed_copy(sink, Viewer())
    fps = 30
    shapes = []  # (packets, payload bytes) per frame of each layer, for its bitrate in packets of <= 1100 bytes
    for _, bitrate in LAYER_BITRATES:
        frame_bytes = bitrate // 8 // fps
        packets = -(-frame_bytes // 1100)
        shapes.append((packets, frame_bytes // packets))
    seq = [0] * len(layers)
    out: dict[str, float] = {}
    try:
        for label, wants in (("LOW", (0,)), ("HIGH", (2,))):
            sink.set_wants(wants)
            frame, sent0, ingest = 0, pair.origin_ep.bytes_out, 0
            t0 = next_at = time.monotonic()
            while time.monotonic() - t0 < seconds:
                for i, (layer, (packets, size)) in enumerate(zip(layers, shapes)):
                    for k in range(packets):
                        descriptor = bytes([0x10, 0x00 if frame % (2 * fps) == 0 else 0x01]) if k == 0 else b"\x00"
                        header = rtp.HEADER.pack(0x80, 96, seq[i] & 0xFFFF, frame * 3000, layer.ssrc)
                        data = header + descriptor + bytes(size)
                        seq[i] += 1
                        ingest += len(data)
                        up.on_packet(layer, data, rtp.parse(data))
                frame += 1
                next_at += 1 / fps
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            elapsed = time.monotonic() - t0
            out[label] = (pair.origin_ep.bytes_out - sent0) / elapsed
            out["ingest"] = ingest / elapsed
    finally:
        pair.close()
    return out


# --- 3. a real cluster -----------------------------------------------------------------------------------------


def start_cluster(log_dir: Path) -> tuple[list[Proc], dict[str, Proc]]:
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed (scripts/ensure-test-deps.sh installs it)")
    redis_port = free_port()
    redis_dir = tempfile.mkdtemp(prefix="braid-bench-redis-")
    procs = [Proc("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", redis_dir], {}, log_dir)]
    env = {"BRAID_KEYS": f"{KEY}: {SECRET}", "BRAID_REDIS__ADDRESS": f"127.0.0.1:{redis_port}",
           "BRAID_LOG_LEVEL": "WARNING"}
    time.sleep(0.3)
    server = [sys.executable, "-m", "braid.server"]
    router_grpc = free_port()
    named: dict[str, Proc] = {}

    def spawn(name: str, args: list[str], extra: dict[str, str] | None = None) -> Proc:
        port = free_port()
        proc = Proc(name, [*server, *args, "--port", str(port)], {**env, **(extra or {})}, log_dir, port)
        procs.append(proc)
        named[name] = proc
        return proc

    spawn("router", ["--role", "router", "--grpc-port", str(router_grpc)])
    for i, region in enumerate(("eu-west", "us-east")):
        spawn(f"media-{region}", ["--role", "media", "--region", region],
              {"BRAID_RTC__PORT_RANGE_START": str(53000 + i * 500), "BRAID_RTC__PORT_RANGE_END": str(53499 + i * 500),
               "BRAID_RTC__UDP_PORT": str(free_port(socket.SOCK_DGRAM)), "BRAID_RTC__TCP_PORT": str(free_port())})
        spawn(f"signal-{region}", ["--role", "signal", "--region", region,
                                   "--router-address", f"127.0.0.1:{router_grpc}"])
    for proc in procs[1:]:
        proc.wait_ready()
    return procs, named


def _cross_region_room(named: dict[str, Proc], room: str):
    """A fresh room whose publisher joins through eu-west and subscribers through us-east: the two signal
    URLs, client ports and a certificate for the raw clients, and the room's name."""
    from aiortc.rtcdtlstransport import RTCCertificate

    from braid.services.media.ice import PortRange

    eu = f"ws://127.0.0.1:{named['signal-eu-west'].http_port}"
    us = f"ws://127.0.0.1:{named['signal-us-east'].http_port}"
    ports = PortRange(47000, 47999, host="127.0.0.1")
    return eu, us, ports, RTCCertificate.generateCertificate(), f"{room}-{int(time.time())}"


async def cluster_case(n: int, named: dict[str, Proc], args: argparse.Namespace) -> dict:
    from braid.clients.harness import join_token

    from .rawclient import RawParticipant, join_subscribers, start_publisher

    eu, us, ports, cert, room = _cross_region_room(named, f"bench-cluster-{n}")
    clients: list[RawParticipant] = []
    sender = None
    try:
        sender = await start_publisher(eu, join_token(KEY, SECRET, room, "publisher"), ports, cert, args.fps,
                                       args.packets_per_frame, clients)
        subscribers = await join_subscribers(us, room, n, lambda r, i: join_token(KEY, SECRET, r, i), ports, cert,
                                             clients)
        await asyncio.sleep(args.warmup)
        origin, edge = named["media-eu-west"], named["media-us-east"]
        packets0 = sum(s.counters.packets for s in subscribers)
        sent0, t0 = sender.sent, time.monotonic()
        cpu_origin0, cpu_edge0 = origin.cpu_seconds(), edge.cpu_seconds()
        await asyncio.sleep(args.duration)
        elapsed = time.monotonic() - t0
        relayed = sender.sent - sent0
        delivered = sum(s.counters.packets for s in subscribers) - packets0
        cpu_origin, cpu_edge = origin.cpu_seconds() - cpu_origin0, edge.cpu_seconds() - cpu_edge0
        joins = sorted(s.join_seconds * 1000 for s in subscribers)
        firsts = sorted(s.first_media_seconds * 1000 for s in subscribers if s.first_media_seconds)
        return {
            "n": n,
            "relayed_pps": relayed / elapsed,
            "delivered_pct": 100 * delivered / max(1, relayed * n),
            "origin_us": 1e6 * cpu_origin / max(1, relayed),
            "edge_us": 1e6 * cpu_edge / max(1, delivered),
            "join_ms": statistics.median(joins),
            "join_p95_ms": joins[int(0.95 * (len(joins) - 1))],
            "media_ms": statistics.median(firsts) if firsts else float("nan"),
            "publisher_join_ms": clients[0].join_seconds * 1000,
        }
    finally:
        if sender is not None:
            await sender.stop()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def concurrent_joins(n: int, named: dict[str, Proc]) -> dict:
    """`n` subscribers joining one room at once through the other region's signal node (the publisher's media
    node hosts the room, so every join crosses signal -> router -> media): join and first-media latency."""
    from braid.clients.harness import join_token

    from .rawclient import RawParticipant, start_publisher

    eu, us, ports, cert, room = _cross_region_room(named, f"bench-joins-{n}")
    clients: list[RawParticipant] = []
    sender = None
    try:
        sender = await start_publisher(eu, join_token(KEY, SECRET, room, "publisher"), ports, cert, 30.0, 4, clients)
        subs = [RawParticipant(us, join_token(KEY, SECRET, room, f"joiner-{i}"), ports, cert, f"joiner-{i}",
                               count_only=True) for i in range(n)]
        clients.extend(subs)
        results = await asyncio.gather(*(s.connect() for s in subs), return_exceptions=True)
        deadline = time.monotonic() + 30
        while any(s.counters.packets == 0 for s, r in zip(subs, results) if r is None) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        joined = [s for s, r in zip(subs, results) if r is None]
        return {
            "n": n, "joined": len(joined),
            "join_p50": 1000 * _percentile([s.join_seconds for s in joined], 0.5),
            "join_p99": 1000 * _percentile([s.join_seconds for s in joined], 0.99),
            "media_p50": 1000 * _percentile([s.first_media_seconds for s in joined if s.first_media_seconds], 0.5),
            "media_p99": 1000 * _percentile([s.first_media_seconds for s in joined if s.first_media_seconds], 0.99),
            "with_media": sum(1 for s in joined if s.first_media_seconds),
        }
    finally:
        if sender is not None:
            await sender.stop()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def main_async(args: argparse.Namespace) -> None:
    print("Relay path, one process, both ends (uvloop, loopback UDP, 1100-byte RTP, SRTP AES-CM-128/HMAC-SHA1-80):")
    for label, rate in (("paced 2000 pps", 2000.0), ("flat out", None)):
        r = await relay_path(args.relay_packets if rate is None else int(2000 * 3), rate)
        print(f"  {label:>15}: {r['us_per_packet']:6.1f} us CPU per relayed packet "
              f"({r['delivered']}/{r['packets']} delivered, {r['pps']:.0f} pps, CPU {r['cpu_pct']:.0f}%)")
    rates = await relay_by_quality(args.quality_seconds)
    print()
    print("Relay bytes per second for one relayed 720p simulcast track (q/h/f at 160/450/1700 kb/s, publisher "
          f"sends {rates['ingest'] / 1000:.0f} kB/s):")
    for label in ("LOW", "HIGH"):
        print(f"  viewer on {label:<4}: {rates[label] / 1000:7.1f} kB/s over the relay "
              f"({8 * rates[label] / 1e6:.2f} Mb/s)")
    if args.skip_cluster:
        return
    log_dir = ROOT / "test-artifacts"
    log_dir.mkdir(exist_ok=True)
    procs, named = start_cluster(log_dir)
    rows = []
    joins = None
    try:
        for n in args.subscribers:
            rows.append(await cluster_case(n, named, args))
        if args.concurrent_joins:
            joins = await concurrent_joins(args.concurrent_joins, named)
    finally:
        for proc in reversed(procs):
            proc.stop()
    print()
    print(f"Cluster: publisher on media node eu-west, N subscribers on media node us-east (every packet crosses the "
          f"relay once); Opus 50 pps + video {args.fps:g} fps x {args.packets_per_frame}, {args.duration:g} s window")
    header = (f"{'N':>4} {'relayed pps':>11} {'delivered':>9} {'origin us/pkt':>13} {'edge us/pkt':>11} "
              f"{'join ms':>8} {'join p95':>8} {'1st media':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['n']:>4} {r['relayed_pps']:>11.0f} {r['delivered_pct']:>8.1f}% {r['origin_us']:>13.1f} "
              f"{r['edge_us']:>11.1f} {r['join_ms']:>8.1f} {r['join_p95_ms']:>8.1f} {r['media_ms']:>8.0f}")
    print("origin us/pkt: CPU of the publisher's media node per packet it received and relayed (ingest included); "
          "edge us/pkt: CPU of the subscribers' node per packet delivered; join: WebSocket open to JoinResponse "
          "through signal, router and media nodes; 1st media: join start to the first relayed RTP packet.")
    if joins is not None:
        print()
        print(f"{joins['n']} concurrent joins through the cluster (signal us-east -> router -> media eu-west, one "
              f"room): {joins['joined']} joined, {joins['with_media']} received media; join p50 "
              f"{joins['join_p50']:.0f} ms, p99 {joins['join_p99']:.0f} ms; first media p50 {joins['media_p50']:.0f} ms, "
              f"p99 {joins['media_p99']:.0f} ms (the clients' own ICE/DTLS run in this one benchmark process)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", default="1,10", help="comma-separated N values (default 1,10)")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--packets-per-frame", type=int, default=4)
    parser.add_argument("--relay-packets", type=int, default=100_000)
    parser.add_argument("--quality-seconds", type=float, default=4.0, help="window per quality (relay bytes)")
    parser.add_argument("--skip-cluster", action="store_true", help="only the in-process relay path")
    parser.add_argument("--concurrent-joins", type=int, default=100, help="subscribers joining at once (0: none)")
    args = parser.parse_args(argv)
    args.subscribers = [int(v) for v in args.subscribers.split(",") if v.strip()]
    run(main_async(args))


if __name__ == "__main__":
    main()
