"""`braid load-test`: N publishers and M subscribers through the official Python SDK, as `lk load-test` does.

    braid load-test --url ws://localhost:7880 --room load --publishers 2 --subscribers 10 --duration 30

Publishers send a generated tone and test-pattern video; subscribers receive everything. A progress bar runs on
stderr while clients join and media flows; at the end a table gives join time, received bitrate, packet loss and
the tester's CPU, so a server's capacity can be judged from what its clients got. Received kbps and loss come
from the SDK's WebRTC stats (the transport's totals where it reports no per-stream ones); audio frames and video
frames per second are what each client decoded.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from dataclasses import dataclass, field


def add_load_test_command(subparsers) -> None:
    from braid.cli import add_credential_args, non_negative_int, positive_float

    p = subparsers.add_parser("load-test", help="N publishers and M subscribers through the SDK; a summary table",
                              description="Join publishers and subscribers, let media flow, print what they got.")
    p.add_argument("--url", help="server URL (env BRAID_URL/LIVEKIT_URL; default ws://localhost:7880)")
    add_credential_args(p)
    p.add_argument("--room", default="", help="room to load (default: load-<random>)")
    p.add_argument("--publishers", type=non_negative_int, default=1, help="participants publishing audio+video")
    p.add_argument("--audio-publishers", type=non_negative_int, default=0, help="participants publishing audio only")
    p.add_argument("--subscribers", type=non_negative_int, default=5, help="participants only subscribing")
    p.add_argument("--duration", type=positive_float, default=20.0, help="seconds of media after joining")
    p.add_argument("--size", default="640x360", help="published video size WxH (default 640x360)")
    p.add_argument("--fps", type=positive_float, default=15.0)
    p.add_argument("--simulcast", action="store_true", help="publish video with simulcast layers")
    p.add_argument("--join-rate", type=positive_float, default=5.0, help="joins per second (default 5)")
    p.set_defaults(handler=cmd_load_test, prog=p.prog)


@dataclass
class Tester:
    identity: str
    role: str  # "publisher" | "audio" | "subscriber"
    room: object = None
    media: object = None
    join_seconds: float = 0.0
    error: str = ""
    bytes_start: int = 0
    bytes_end: int = 0
    received: int = 0
    lost: int = 0
    frames: dict = field(default_factory=lambda: {"audio": 0, "video": 0})
    readers: list = field(default_factory=list)

    def on_track(self, track, publication, participant) -> None:
        """Consume what arrives, as a real client plays it, counting decoded frames."""
        from livekit import rtc

        audio = track.kind == rtc.TrackKind.KIND_AUDIO
        stream = rtc.AudioStream(track) if audio else rtc.VideoStream(track)
        self.readers.append(asyncio.ensure_future(self._count(stream, "audio" if audio else "video")))

    async def _count(self, stream, kind: str) -> None:
        async for _ in stream:
            self.frames[kind] += 1


@dataclass
class Summary:
    rows: list[tuple[str, ...]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append(tuple(str(c) for c in cells))

    def render(self) -> str:
        widths = [max(len(row[i]) for row in self.rows) for i in range(len(self.rows[0]))]
        lines = []
        for n, row in enumerate(self.rows):
            lines.append("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def progress(label: str, done: int, total: int, width: int = 30) -> None:
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r{label:<10} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()
    if done >= total:
        sys.stderr.write("\n")


async def _inbound(room) -> tuple[int, int, int]:
    """Bytes received, packets received and packets lost: from the inbound RTP streams, or where the SDK reports
    none of those, the transport's candidate pairs (which count no loss)."""
    stats = await room.get_rtc_stats()
    items = list(stats.subscriber_stats) + list(stats.publisher_stats)
    rtp = [i.inbound_rtp for i in items if i.WhichOneof("stats") == "inbound_rtp"]
    if rtp:
        return (sum(r.inbound.bytes_received for r in rtp), sum(r.received.packets_received for r in rtp),
                sum(max(0, r.received.packets_lost) for r in rtp))
    pairs = [i.candidate_pair.candidate_pair for i in items if i.WhichOneof("stats") == "candidate_pair"]
    return sum(p.bytes_received for p in pairs), sum(p.packets_received for p in pairs), 0


async def run_load_test(url: str, api_key: str, api_secret: str, args: argparse.Namespace) -> Summary:
    from livekit import rtc

    from braid.clients.harness import join_token
    from braid.clients.media import DemoMedia

    width, _, height = args.size.partition("x")
    room_name = args.room or f"load-{secrets.token_hex(3)}"
    testers = ([Tester(f"pub-{i}", "publisher") for i in range(args.publishers)]
               + [Tester(f"audio-{i}", "audio") for i in range(args.audio_publishers)]
               + [Tester(f"sub-{i}", "subscriber") for i in range(args.subscribers)])
    cpu_start, wall_start = time.process_time(), time.monotonic()

    async def join(tester: Tester) -> None:
        tester.room = rtc.Room()
        tester.room.on("track_subscribed", tester.on_track)
        started = time.monotonic()
        grants: dict = {}
        try:
            await asyncio.wait_for(tester.room.connect(url, join_token(api_key, api_secret, room_name,
                                                                       tester.identity, **grants)), 20)
            tester.join_seconds = time.monotonic() - started
            if tester.role != "subscriber":
                tester.media = DemoMedia(width=int(width), height=int(height), fps=args.fps,
                                         simulcast=args.simulcast, video=tester.role == "publisher",
                                         frequency=300 + 20 * len(tester.identity))
                await tester.media.start(tester.room)
        except Exception as exc:
            tester.error = str(exc) or type(exc).__name__

    done = 0
    for tester in testers:
        await join(tester)
        done += 1
        progress("joining", done, len(testers))
        await asyncio.sleep(1 / args.join_rate)
    joined = [t for t in testers if not t.error]
    await asyncio.sleep(4)  # subscriptions settle, first keyframes arrive
    for tester in joined:
        tester.bytes_start, tester.received, tester.lost = await _inbound(tester.room)
    frames_start = {t.identity: dict(t.frames) for t in joined}
    measure_start = time.monotonic()
    steps = max(1, int(args.duration))
    for step in range(steps):
        await asyncio.sleep(args.duration / steps)
        progress("media", step + 1, steps)
    measured = time.monotonic() - measure_start
    for tester in joined:
        tester.bytes_end, received, lost = await _inbound(tester.room)
        tester.received, tester.lost = received - tester.received, lost - tester.lost
        tester.frames = {k: v - frames_start[tester.identity][k] for k, v in tester.frames.items()}
    cpu = (time.process_time() - cpu_start) / max(1e-6, time.monotonic() - wall_start) * 100
    for tester in testers:
        for reader in tester.readers:
            reader.cancel()
        if tester.media is not None:
            await tester.media.stop()
        if tester.room is not None:
            try:
                await asyncio.wait_for(tester.room.disconnect(), 5)
            except Exception:
                pass

    summary = Summary()
    summary.add("role", "joined", "join p50 ms", "join max ms", "recv kbps/client", "audio fr/s", "video fps",
                "loss %")
    for role in ("publisher", "audio", "subscriber"):
        group = [t for t in testers if t.role == role]
        if not group:
            continue
        ok = [t for t in group if not t.error]
        joins = [t.join_seconds * 1000 for t in ok] or [0.0]
        kbps = [(t.bytes_end - t.bytes_start) * 8 / measured / 1000 for t in ok] or [0.0]
        packets = sum(t.received for t in ok)
        lost = sum(t.lost for t in ok)
        audio = statistics.mean([t.frames["audio"] / measured for t in ok] or [0.0])
        video = statistics.mean([t.frames["video"] / measured for t in ok] or [0.0])
        summary.add(role, f"{len(ok)}/{len(group)}", f"{statistics.median(joins):.0f}", f"{max(joins):.0f}",
                    f"{statistics.mean(kbps):.0f}", f"{audio:.0f}", f"{video:.1f}",
                    f"{100 * lost / max(1, packets + lost):.2f}")
    summary.add("tester CPU", f"{cpu:.0f}%", "", "", "", "", "", "")
    for tester in testers:
        if tester.error:
            print(f"{tester.identity}: {tester.error}", file=sys.stderr)
    return summary


def cmd_load_test(args: argparse.Namespace) -> int:
    from braid.cli import CLIError, resolve_credentials

    if args.publishers + args.audio_publishers + args.subscribers == 0:
        raise CLIError("nothing to do: give --publishers, --audio-publishers or --subscribers")
    url = args.url or ""
    if not url:
        from braid.cli import _first_env

        url = _first_env(("BRAID_URL", "LIVEKIT_URL")) or "ws://localhost:7880"
    url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    api_key, api_secret = resolve_credentials(args)
    summary = asyncio.run(run_load_test(url, api_key, api_secret, args))
    print(summary.render())
    return 0
