"""`make bench`: one publisher (audio + 30 fps video) and N subscribers on `braid-server --dev`.

For each N it starts a fresh server process, joins the publisher and N subscribers over `/rtc/v1` with real
ICE/DTLS/SRTP (benchmarks/rawclient.py: no codecs, so the client side stays cheap), lets media flow, and prints:
forwarded packets per second (received by all subscribers), server CPU microseconds per forwarded packet (user +
system time of the server process over the window), join latency (WebSocket open → JoinResponse, and → first
media packet) and the server's RSS.

    python -m benchmarks.run [--subscribers 1,10,50] [--duration 10] [--fps 30] [--packets-per-frame 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from aiortc.rtcdtlstransport import RTCCertificate

from braid.clients.harness import join_token
from braid.services.media.ice import PortRange

from .procs import ROOT, Proc, free_port, run
from .rawclient import RawParticipant, join_subscribers, start_publisher

KEY, SECRET = "devkey", "secret"


def start_dev_server(log_dir: Path) -> Proc:
    port = free_port()
    env = {"BRAID_LOG_LEVEL": "WARNING", "BRAID_RTC__PORT_RANGE_START": "40000", "BRAID_RTC__PORT_RANGE_END": "44999"}
    server = Proc(f"server-{port}", [sys.executable, "-m", "braid.server", "--dev", "--port", str(port)], env,
                  log_dir, port)
    server.wait_ready(30)
    return server


async def run_case(n: int, args: argparse.Namespace, log_dir: Path) -> dict:
    server = start_dev_server(log_dir)
    ports = PortRange(45000, 49999, host="127.0.0.1")
    cert = RTCCertificate.generateCertificate()
    room = f"bench-{n}"
    clients: list[RawParticipant] = []
    sender = None
    try:
        sender = await start_publisher(server.url, join_token(KEY, SECRET, room, "publisher"), ports, cert, args.fps,
                                       args.packets_per_frame, clients)
        subscribers = await join_subscribers(server.url, room, n, lambda r, i: join_token(KEY, SECRET, r, i), ports, cert,
                                             clients)
        await asyncio.sleep(args.warmup)
        packets0 = sum(s.counters.packets for s in subscribers)
        sent0, cpu0, t0 = sender.sent, server.cpu_seconds(), time.monotonic()
        await asyncio.sleep(args.duration)
        elapsed = time.monotonic() - t0
        forwarded = sum(s.counters.packets for s in subscribers) - packets0
        cpu = server.cpu_seconds() - cpu0
        joins = sorted(s.join_seconds * 1000 for s in subscribers)
        firsts = sorted(s.first_media_seconds * 1000 for s in subscribers if s.first_media_seconds)
        return {
            "n": n,
            "in_pps": (sender.sent - sent0) / elapsed,
            "out_pps": forwarded / elapsed,
            "expected_pps": (sender.sent - sent0) / elapsed * n,
            "cpu_pct": 100 * cpu / elapsed,
            "us_per_pkt": 1e6 * cpu / forwarded if forwarded else float("nan"),
            "join_ms": statistics.median(joins),
            "join_p95_ms": joins[int(0.95 * (len(joins) - 1))],
            "media_ms": statistics.median(firsts) if firsts else float("nan"),
            "rss_mb": server.rss_mb(),
        }
    finally:
        if sender is not None:
            await sender.stop()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        server.stop()


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    print()
    print(f"Braid forwarding benchmark: 1 publisher (Opus 50 pps + video {args.fps:g} fps x "
          f"{args.packets_per_frame} packets), N subscribers, {args.duration:g} s window, "
          f"{os.cpu_count()} CPUs, loop={'uvloop' if os.environ.get('BRAID_NO_UVLOOP') != '1' else 'asyncio'}")
    header = (f"{'N':>4} {'in pps':>8} {'fwd pps':>9} {'delivered':>9} {'srv CPU':>8} {'us/pkt':>7} "
              f"{'join ms':>8} {'join p95':>8} {'1st media':>9} {'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        delivered = 100 * r["out_pps"] / r["expected_pps"] if r["expected_pps"] else 0
        print(f"{r['n']:>4} {r['in_pps']:>8.0f} {r['out_pps']:>9.0f} {delivered:>8.1f}% {r['cpu_pct']:>7.1f}% "
              f"{r['us_per_pkt']:>7.1f} {r['join_ms']:>8.1f} {r['join_p95_ms']:>8.1f} {r['media_ms']:>8.0f} "
              f"{r['rss_mb']:>7.1f}")
    print("srv CPU: user+system time of the server process; us/pkt: server CPU per forwarded packet "
          "(ingest, RTCP and signalling included); 1st media: join start to the first RTP packet.")


async def main_async(args: argparse.Namespace) -> None:
    log_dir = ROOT / "test-artifacts"
    log_dir.mkdir(exist_ok=True)
    rows = []
    for n in args.subscribers:
        rows.append(await run_case(n, args, log_dir))
        r = rows[-1]
        print(f"N={n}: {r['out_pps']:.0f} forwarded pps, {r['us_per_pkt']:.1f} us/packet", file=sys.stderr)
    _print(rows, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", default="1,10,50", help="comma-separated N values (default 1,10,50)")
    parser.add_argument("--duration", type=float, default=10.0, help="measurement window in seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of media before measuring")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--packets-per-frame", type=int, default=4)
    args = parser.parse_args(argv)
    args.subscribers = [int(v) for v in args.subscribers.split(",") if v.strip()]
    run(main_async(args))


if __name__ == "__main__":
    main()
