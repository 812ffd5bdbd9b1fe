"""`make bench`: one publisher (audio + 30 fps video) and N subscribers on `braid-server --dev`, for each send path.

For each send path (compiled: C SRTP + sendmmsg batching; python: pylibsrtp + one sendto per packet, the
reference) and each N it starts a fresh server process, joins the publisher and N subscribers over `/rtc/v1` with
real ICE/DTLS/SRTP (benchmarks/rawclient.py: no codecs, and once media flows the subscribers count datagrams
without decrypting them, so the client side stays cheap), lets media flow, and prints: forwarded packets per second
(received by all subscribers), server CPU microseconds per forwarded packet (user + system time of the server
process over the window: CPU time, not wall time, so other load on the machine inflates it only through cache and
scheduler effects), join latency, the server's RSS and its growth per subscribed track; then writes a PNG plot
of CPU per forwarded packet against N for both paths.

Each send path runs with every participant on the server's one UDP port (rtc.udp_port, the default); the
compiled path runs once more with a UDP socket per PeerConnection from the port range (rtc.udp_port 0), so the
cost of demultiplexing the shared port shows side by side.

    python -m benchmarks.run [--subscribers 1,10,50,100,200] [--paths compiled,python]
                             [--modes udp-port,port-range] [--duration 10]
                             [--fps 30] [--packets-per-frame 15] [--plot test-artifacts/bench-forwarding.png]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from aiortc.rtcdtlstransport import RTCCertificate

from braid.clients.harness import join_token
from braid.services.media import fastpath
from braid.services.media.ice import PortRange

from .procs import ROOT, Proc, free_port, run
from .rawclient import RawParticipant, join_subscribers, start_publisher

PATHS = {"compiled": "true", "python": "false"}  # -> rtc.fast_path
MODES = {  # how participants reach the server: its one shared UDP port (the default), or a socket each
    "udp-port": lambda: {"BRAID_RTC__UDP_PORT": str(free_port(socket.SOCK_DGRAM))},
    "port-range": lambda: {"BRAID_RTC__UDP_PORT": "0"},
}
TARGETS = {1: 40.0, 10: 5.0}  # issue 15: us of server CPU per forwarded packet at N = 1 and N >= 10

KEY, SECRET = "devkey", "secret"


class Saturated(Exception):
    """A case the server could not take: it was saturated before every subscriber joined."""


def start_dev_server(log_dir: Path, path: str = "compiled", mode: str = "udp-port") -> Proc:
    port = free_port()
    env = {"BRAID_LOG_LEVEL": "INFO", "BRAID_RTC__PORT_RANGE_START": "40000", "BRAID_RTC__PORT_RANGE_END": "44999",
           "BRAID_RTC__FAST_PATH": PATHS[path], "BRAID_RTC__TCP_PORT": str(free_port()), **MODES[mode]()}
    server = Proc(f"server-{port}", [sys.executable, "-m", "braid.server", "--dev", "--port", str(port)], env,
                  log_dir, port)
    server.wait_ready(30)
    return server


async def run_case(n: int, path: str, mode: str, args: argparse.Namespace, log_dir: Path) -> dict:
    server = start_dev_server(log_dir, path, mode)
    ports = PortRange(45000, 49999, host="127.0.0.1")
    cert = RTCCertificate.generateCertificate()
    room = f"bench-{n}"
    clients: list[RawParticipant] = []
    sender = None
    try:
        sender = await start_publisher(server.url, join_token(KEY, SECRET, room, "publisher"), ports, cert, args.fps,
                                       args.packets_per_frame, clients)
        await asyncio.sleep(1.0)
        rss_before = server.rss_mb()
        started = time.monotonic()
        try:
            subscribers = await join_subscribers(server.url, room, n, lambda r, i: join_token(KEY, SECRET, r, i), ports,
                                                 cert, clients, count_only=True, feedback=args.feedback)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            receiving = [c for c in clients if c is not clients[0] and c.counters.packets]
            raise Saturated(f"the server saturated before {n} subscribers joined: {len(receiving)} receive media, "
                            f"{sum(c.counters.packets for c in receiving) / max(1, time.monotonic() - started):.0f} "
                            f"packets/s forwarded to them on average since the first joined, and the next join's "
                            f"answer took over 10 s") from exc
        await asyncio.sleep(args.warmup)
        packets0 = sum(s.counters.packets for s in subscribers)
        sent0, cpu0, t0 = sender.sent, server.cpu_seconds(), time.monotonic()
        await asyncio.sleep(args.duration)
        elapsed = time.monotonic() - t0
        forwarded = sum(s.counters.packets for s in subscribers) - packets0
        cpu = server.cpu_seconds() - cpu0
        joins = sorted(s.join_seconds * 1000 for s in subscribers)
        rss = server.rss_mb()
        return {
            "n": n,
            "path": path,
            "mode": mode,
            "rss_per_track_kb": 1024 * (rss - rss_before) / (2 * n),
            "in_pps": (sender.sent - sent0) / elapsed,
            "out_pps": forwarded / elapsed,
            "expected_pps": (sender.sent - sent0) / elapsed * n,
            "cpu_pct": 100 * cpu / elapsed,
            "us_per_pkt": 1e6 * cpu / forwarded if forwarded else float("nan"),
            "join_ms": statistics.median(joins),
            "join_p95_ms": joins[int(0.95 * (len(joins) - 1))],
            "rss_mb": rss,
        }
    finally:
        if sender is not None:
            await sender.stop()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        server.stop()


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    print()
    print(f"Braid forwarding benchmark: 1 publisher (Opus 50 pps + video {args.fps:g} fps x "
          f"{args.packets_per_frame} packets), N subscribers "
          f"({'sending transport-wide feedback every 100 ms' if args.feedback else 'sending no feedback'}), "
          f"{args.duration:g} s window, "
          f"{os.cpu_count()} CPUs, loop={'uvloop' if os.environ.get('BRAID_NO_UVLOOP') != '1' else 'asyncio'}, "
          f"load average {os.getloadavg()[0]:.1f} at the end (other processes share this machine)")
    header = (f"{'path':>8} {'mode':>10} {'N':>4} {'in pps':>7} {'fwd pps':>8} {'delivered':>9} {'srv CPU':>8} "
              f"{'us/pkt':>7} {'join ms':>8} {'join p95':>8} {'RSS MB':>7} {'KB/track':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        delivered = 100 * r["out_pps"] / r["expected_pps"] if r["expected_pps"] else 0
        print(f"{r['path']:>8} {r['mode']:>10} {r['n']:>4} {r['in_pps']:>7.0f} {r['out_pps']:>8.0f} {delivered:>8.1f}% "
              f"{r['cpu_pct']:>7.1f}% {r['us_per_pkt']:>7.1f} {r['join_ms']:>8.1f} {r['join_p95_ms']:>8.1f} "
              f"{r['rss_mb']:>7.1f} {r['rss_per_track_kb']:>8.1f}")
    print("srv CPU: user+system time of the server process; us/pkt: server CPU per forwarded packet "
          "(ingest, RTCP and signalling included); join: WebSocket open to JoinResponse (subscribers join one "
          "after another while media flows); "
          "KB/track: RSS growth per subscribed track (2 per subscriber); mode: udp-port = every participant on the "
          "server's one UDP port (the default), port-range = a UDP socket per PeerConnection.")
    for r in rows:
        target = TARGETS[1] if r["n"] == 1 else TARGETS[10] if r["n"] >= 10 else None
        if r["path"] == "compiled" and r["mode"] == "udp-port" and target is not None:
            verdict = "meets" if r["us_per_pkt"] <= target else "MISSES"
            print(f"  compiled, N={r['n']}: {r['us_per_pkt']:.1f} us/pkt {verdict} the target of {target:g} us")


def plot(rows: list[dict], out: Path, args: argparse.Namespace) -> bool:
    """CPU per forwarded packet against N, one line per send path; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path, mode in dict.fromkeys((r["path"], r["mode"]) for r in rows):
        points = [(r["n"], r["us_per_pkt"]) for r in rows if (r["path"], r["mode"]) == (path, mode)]
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=f"{path} send path, {mode}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("subscribers N")
    ax.set_ylabel("server CPU us per forwarded packet")
    ax.set_title(f"Braid forwarding cost, 1 publisher at ~{50 + args.fps * args.packets_per_frame:.0f} pps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


async def main_async(args: argparse.Namespace) -> None:
    log_dir = ROOT / "test-artifacts"
    log_dir.mkdir(exist_ok=True)
    rows: list[dict] = []
    saturated: list[str] = []
    paths = [p for p in args.paths if not (p == "compiled" and fastpath.UNAVAILABLE)]
    if len(paths) < len(args.paths):
        print(f"skipping the compiled path: {fastpath.UNAVAILABLE}", file=sys.stderr)
    cases = [(path, "udp-port") for path in paths if "udp-port" in args.modes]
    if "port-range" in args.modes and paths:
        cases.append((paths[0], "port-range"))
    for path, mode in cases:
        for n in args.subscribers:
            try:
                rows.append(await run_case(n, path, mode, args, log_dir))
            except Saturated as exc:
                saturated.append(f"{path} {mode} N={n}: {exc}")
                print(saturated[-1], file=sys.stderr)
                continue
            except Exception as exc:  # one case failing (a loaded machine refusing joins) must not lose the rest
                print(f"{path} {mode} N={n}: case failed: {exc!r}"[:300], file=sys.stderr)
                continue
            r = rows[-1]
            print(f"{path} {mode} N={n}: {r['out_pps']:.0f} forwarded pps, {r['us_per_pkt']:.1f} us/packet",
                  file=sys.stderr)
    _print(rows, args)
    for line in saturated:
        print(f"  {line}")
    if plot(rows, args.plot, args):
        print(f"plot of us/pkt against N: {args.plot}")
    else:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", default="1,10,50,100,200", help="comma-separated N values")
    parser.add_argument("--paths", default="compiled,python", help="send paths to measure: compiled,python")
    parser.add_argument("--plot", type=Path, default=ROOT / "test-artifacts" / "bench-forwarding.png")
    parser.add_argument("--duration", type=float, default=10.0, help="measurement window in seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of media before measuring")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--packets-per-frame", type=int, default=15)
    parser.add_argument("--no-feedback", dest="feedback", action="store_false",
                        help="subscribers send no transport-wide feedback (browsers do: by default they do too)")
    parser.add_argument("--modes", default=",".join(MODES), help="udp-port,port-range (port-range: first path only)")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - set(MODES):
        parser.error(f"unknown mode(s): {', '.join(sorted(set(args.modes) - set(MODES)))}")
    args.subscribers = [int(v) for v in args.subscribers.split(",") if v.strip()]
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown send path(s): {', '.join(sorted(unknown))}")
    run(main_async(args))


if __name__ == "__main__":
    main()
