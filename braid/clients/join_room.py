"""`braid join-room`: join a room with the official LiveKit Python SDK, optionally publishing demo media.

    braid join-room --url ws://localhost:7880 --api-key devkey --api-secret secret \\
        --room my-room --identity bot --publish-demo

`--publish-demo` publishes a looped, generated tone (440 Hz) and a test-pattern video (no download). The command
prints who is in the room and what happens there; Ctrl-C (or `--duration`) leaves cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
import time


def add_join_room_command(subparsers) -> None:
    from braid.cli import add_credential_args, positive_float

    parser = subparsers.add_parser(
        "join-room",
        help="join a room as a participant (optionally publishing demo audio and video)",
        description="Join a room with the official LiveKit SDK and print what happens there. Ctrl-C leaves.",
    )
    parser.add_argument("--url", help="server URL, ws(s):// or http(s):// (env BRAID_URL/LIVEKIT_URL; "
                                      "default ws://localhost:7880)")
    add_credential_args(parser)
    parser.add_argument("--room", required=True, help="room to join")
    parser.add_argument("--identity", help="participant identity (default: bot-<random>)")
    parser.add_argument("--name", default="", help="display name")
    parser.add_argument("--metadata", default="", help="participant metadata")
    parser.add_argument("--token", help="use this access token instead of minting one")
    parser.add_argument("--publish-demo", action="store_true", help="publish a generated tone and test pattern")
    parser.add_argument("--frequency", type=positive_float, default=440.0, help="demo tone in Hz (default 440)")
    parser.add_argument("--size", default="640x360", help="demo video size WxH (default 640x360)")
    parser.add_argument("--fps", type=positive_float, default=15.0, help="demo video frame rate (default 15)")
    parser.add_argument("--simulcast", action="store_true",
                        help="publish the demo video with simulcast layers (SVC layers for vp9 and av1)")
    parser.add_argument("--codec", choices=("vp8", "h264", "vp9", "av1"),
                        help="demo video codec (default: the SDK's, vp8)")
    parser.add_argument("--duration", type=float, default=0.0, help="leave after this many seconds (default: "
                                                                    "stay until Ctrl-C)")
    parser.set_defaults(handler=run_join_room, prog=parser.prog)


def _ws_url(args: argparse.Namespace) -> str:
    from braid.cli import resolve_url

    url = resolve_url(args)
    return "ws" + url[len("http"):] if url.startswith("http") else url


def _size(text: str) -> tuple[int, int]:
    from braid.cli import CLIError

    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w < 16 or h < 16 or w % 2 or h % 2:
            raise ValueError
    except ValueError:
        raise CLIError(f"invalid --size {text!r} (use an even WxH such as 640x360)") from None
    return w, h


def run_join_room(args: argparse.Namespace) -> int:
    from braid.cli import CLIError, resolve_credentials

    if args.url is None:
        import os

        if not (os.environ.get("BRAID_URL") or os.environ.get("LIVEKIT_URL")):
            args.url = "ws://localhost:7880"
    url = _ws_url(args)
    identity = args.identity or f"bot-{secrets.token_hex(3)}"
    width, height = _size(args.size)
    if args.token:
        token = args.token
    else:
        from braid.clients.harness import join_token

        key, secret = resolve_credentials(args)
        token = join_token(key, secret, args.room, identity, name=args.name, metadata=args.metadata, ttl=6 * 3600)
    try:
        return asyncio.run(_session(url, token, identity, args, width, height))
    except ConnectionError as exc:
        raise CLIError(str(exc)) from None


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


async def _session(url: str, token: str, identity: str, args: argparse.Namespace, width: int, height: int) -> int:
    from livekit import rtc

    from braid.clients.media import DemoMedia

    room = rtc.Room()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass

    room.on("participant_connected", lambda p: _say(f"{p.identity} joined"))
    room.on("participant_disconnected", lambda p: _say(f"{p.identity} left"))
    room.on("track_subscribed", lambda t, pub, p: _say(f"receiving {p.identity}'s {pub.name or pub.sid} "
                                                       f"({'audio' if t.kind == rtc.TrackKind.KIND_AUDIO else 'video'})"))
    room.on("track_unpublished", lambda pub, p: _say(f"{p.identity} unpublished {pub.name or pub.sid}"))
    room.on("data_received", lambda d: _say(
        f"data from {d.participant.identity if d.participant else 'server'}: {d.data[:80]!r}"))

    def on_disconnected(reason) -> None:
        _say(f"disconnected by the server ({reason})")
        stop.set()

    room.on("disconnected", on_disconnected)
    started = time.monotonic()
    try:
        await asyncio.wait_for(room.connect(url, token), 20)
    except Exception as exc:
        raise ConnectionError(f"could not join {args.room!r} at {url}: {exc}") from None
    _say(f"joined room {args.room!r} as {identity} ({room.local_participant.sid}) in "
         f"{(time.monotonic() - started) * 1000:.0f} ms; others: {sorted(room.remote_participants) or 'none'}")
    media = None
    try:
        if args.publish_demo:
            media = DemoMedia(frequency=args.frequency, width=width, height=height, fps=args.fps,
                              simulcast=args.simulcast, codec=args.codec or "")
            await media.start(room)
            _say(f"publishing a {args.frequency:g} Hz tone and a {width}x{height}@{args.fps:g} test pattern"
                 " (Ctrl-C to leave)")
        else:
            _say("connected (Ctrl-C to leave)")
        if args.duration > 0:
            try:
                await asyncio.wait_for(stop.wait(), args.duration)
            except asyncio.TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        if media is not None:
            await media.stop()
        if room.isconnected():
            try:
                await asyncio.wait_for(room.disconnect(), 5)
            except Exception:
                pass
            _say("left the room")
    return 0


if __name__ == "__main__":  # pragma: no cover - `braid join-room` is the entry point
    sys.exit("use: braid join-room --help")
