"""The `braid` command: the getting-started flow a LiveKit user knows.

    braid create-token --api-key devkey --api-secret secret --join --room my-room --identity user1 --valid-for 24h
    braid room create my-room --url http://localhost:7880
    braid room list
    braid room delete my-room
    braid room participants list --room my-room
    braid dispatch create --room my-room --agent-name my-agent
    braid send-data --room my-room "hello" --topic chat

Credentials come from `--api-key`/`--api-secret`, else `BRAID_API_KEY`/`BRAID_API_SECRET`, else
`LIVEKIT_API_KEY`/`LIVEKIT_API_SECRET`, else the dev pair devkey/secret (with a note on stderr).
The server URL comes from `--url`, else `BRAID_URL`, else `LIVEKIT_URL`, else http://localhost:7880.

Adding a command: write a function that takes the `subparsers` object, adds its parser(s) and sets
``handler=<function(args) -> int>`` with `set_defaults`, then list it in `COMMAND_GROUPS` (see the
bottom of this module). `add_server_args`, `resolve_credentials`, `resolve_url` and `CLIError` are
there for such commands to reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import sys
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

from braid.shared.auth import mint_token
from braid.shared.config import DEV_KEYS

DEFAULT_URL = "http://localhost:7880"
DEFAULT_TTL_SECONDS = 6 * 3600  # livekit-api AccessToken's default
DEFAULT_TIMEOUT = 10.0  # livekit-api LiveKitAPI's default
DEV_API_KEY, DEV_API_SECRET = next(iter(DEV_KEYS.items()))

KEY_ENV = ("BRAID_API_KEY", "LIVEKIT_API_KEY")
SECRET_ENV = ("BRAID_API_SECRET", "LIVEKIT_API_SECRET")
URL_ENV = ("BRAID_URL", "LIVEKIT_URL")

TRACK_SOURCES = ("camera", "microphone", "screen_share", "screen_share_audio")
PARTICIPANT_KINDS = ("standard", "egress", "ingress", "sip", "agent")

Handler = Callable[[argparse.Namespace], int]
CommandGroup = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
T = TypeVar("T")


class CLIError(Exception):
    """A failure reported as one line on stderr; exit status 1 (2 for usage errors)."""

    exit_code = 1


class UsageError(CLIError):
    exit_code = 2


# ---------------------------------------------------------------------------------------------
# Argument parsing helpers
# ---------------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|m|s)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> int:
    """`90s`, `10m`, `24h`, `1h30m` (Go duration style, h/m/s) or plain seconds → whole seconds."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+", value):
        seconds = float(value)
    else:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r} (use e.g. 90s, 10m, 24h or 1h30m)"
            )
    if int(seconds) < 1:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be at least 1s")
    return int(seconds)


def format_duration(seconds: int) -> str:
    """The inverse of `parse_duration`, shortest form: 5400 → `1h30m`."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return out or "0s"


def parse_attribute(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"invalid attribute {text!r} (use key=value)")
    return key.strip(), value


def parse_sources(text: str) -> list[str]:
    sources = []
    for part in text.split(","):
        source = part.strip().lower()
        if not source:
            continue
        if source not in TRACK_SOURCES:
            raise argparse.ArgumentTypeError(
                f"invalid track source {part.strip()!r} (one of {', '.join(TRACK_SOURCES)})"
            )
        sources.append(source)
    return sources


def parse_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _first_env(names: Iterable[str]) -> str:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return ""


def add_credential_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", help="API key (env BRAID_API_KEY or LIVEKIT_API_KEY; default devkey)")
    parser.add_argument("--api-secret", help="API secret (env BRAID_API_SECRET or LIVEKIT_API_SECRET; default secret)")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """`--url`, `--api-key`, `--api-secret`, `--timeout`: what every command talking to a server takes."""
    parser.add_argument(
        "--url", help=f"server URL, http(s):// or ws(s):// (env BRAID_URL or LIVEKIT_URL; default {DEFAULT_URL})"
    )
    add_credential_args(parser)
    parser.add_argument(
        "--timeout", type=positive_float, default=DEFAULT_TIMEOUT, help="request timeout in seconds (default 10)"
    )


def resolve_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """Flags, then BRAID_*, then LIVEKIT_* env vars; with none at all, the dev pair (noted on stderr)."""
    key = (getattr(args, "api_key", None) or "").strip() or _first_env(KEY_ENV)
    secret = (getattr(args, "api_secret", None) or "").strip() or _first_env(SECRET_ENV)
    if key and secret:
        return key, secret
    if key or secret:
        missing = "--api-secret" if key else "--api-key"
        raise UsageError(f"{missing} is required (or set {SECRET_ENV[0] if key else KEY_ENV[0]})")
    print(
        f"note: no API key given (--api-key/--api-secret, {KEY_ENV[0]}/{SECRET_ENV[0]} or "
        f"{KEY_ENV[1]}/{SECRET_ENV[1]}); using the dev pair {DEV_API_KEY}/{DEV_API_SECRET}",
        file=sys.stderr,
    )
    return DEV_API_KEY, DEV_API_SECRET


def resolve_url(args: argparse.Namespace) -> str:
    """The server's http(s) base URL; ws:// and wss:// are rewritten, a bare host:port gets http://."""
    url = (getattr(args, "url", None) or "").strip() or _first_env(URL_ENV) or DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    scheme = {"ws": "http", "wss": "https"}.get(scheme.lower(), scheme.lower())
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise UsageError(f"invalid --url {url!r} (use http://host:port, https://, ws:// or wss://)")
    return f"{scheme}://{rest}".rstrip("/")


# ---------------------------------------------------------------------------------------------
# braid create-token
# ---------------------------------------------------------------------------------------------

# (flag, camelCase video grant key, help). Order = livekit-api VideoGrants field order, so the
# claim comes out key-for-key as AccessToken writes it.
_ROOM_FLAGS = (
    ("--create", "roomCreate", "may create and delete rooms"),
    ("--list", "roomList", "may list rooms"),
    ("--record", "roomRecord", "may record rooms"),
    ("--admin", "roomAdmin", "may administer the room given by --room"),
    ("--join", "roomJoin", "may join the room given by --room (needs --identity)"),
)
_DEFAULT_TRUE = (  # (dest, grant key, on-flags, off-flags, what)
    ("can_publish", "canPublish", ("--can-publish",), ("--no-publish", "--no-can-publish"), "publish tracks"),
    ("can_subscribe", "canSubscribe", ("--can-subscribe",), ("--no-subscribe", "--no-can-subscribe"),
     "subscribe to tracks"),
    ("can_publish_data", "canPublishData", ("--can-publish-data",), ("--no-publish-data", "--no-can-publish-data"),
     "send data messages"),
)
_OPTIONAL_FLAGS = (
    ("--can-update-own-metadata", "canUpdateOwnMetadata", "may update its own name, metadata and attributes"),
    ("--ingress-admin", "ingressAdmin", "may manage ingresses"),
    ("--hidden", "hidden", "is not visible to other participants"),
    ("--recorder", "recorder", "is a recorder (deprecated grant)"),
    ("--agent", "agent", "may register as an agent worker"),
    ("--can-manage-agent-session", "canManageAgentSession", "may manage an agent session"),
    ("--can-subscribe-metrics", "canSubscribeMetrics", "may subscribe to metrics"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_create_token_command(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "create-token",
        help="mint an access token",
        description="Mint an access token (HS256 JWT) exactly as livekit-api's AccessToken does. "
        "The token goes to stdout; identity, room and grants to stderr.",
    )
    add_credential_args(p)
    p.add_argument("--identity", "-i", default="", help="participant identity (the token's sub)")
    p.add_argument("--name", default="", help="participant display name")
    p.add_argument("--room", "-r", default="", help="room the grants apply to")
    p.add_argument("--metadata", default="", help="participant metadata")
    p.add_argument("--attribute", "-a", action="append", type=parse_attribute, default=[], metavar="KEY=VALUE",
                   help="participant attribute (repeatable)")
    p.add_argument("--kind", choices=PARTICIPANT_KINDS, default="", help="participant kind")
    p.add_argument("--valid-for", type=parse_duration, default=DEFAULT_TTL_SECONDS, metavar="DURATION",
                   help="how long the token is valid: 90s, 10m, 24h, 1h30m (default 6h)")
    grants = p.add_argument_group("room grants")
    for flag, _, text in _ROOM_FLAGS:
        grants.add_argument(flag, dest=_dest(flag), action="store_true", default=None, help=text)
    grants.add_argument("--destination-room", default="", help="room a participant may be moved to")
    perms = p.add_argument_group("participant permissions (publish, subscribe and data default to allowed)")
    for dest, _, on, off, what in _DEFAULT_TRUE:
        perms.add_argument(*on, dest=dest, action="store_true", default=None, help=f"may {what} (default)")
        perms.add_argument(*off, dest=dest, action="store_false", help=f"may not {what}")
    perms.add_argument("--can-publish-sources", "--allow-source", dest="can_publish_sources", action="extend",
                       type=parse_sources, default=None, metavar="SOURCES",
                       help=f"only these track sources may be published, comma-separated ({', '.join(TRACK_SOURCES)})")
    for flag, _, text in _OPTIONAL_FLAGS:
        perms.add_argument(flag, dest=_dest(flag), action="store_true", default=None, help=text)
    p.set_defaults(handler=cmd_create_token, prog=p.prog)


def video_grant(args: argparse.Namespace) -> dict[str, Any]:
    """The `video` claim for the flags, with AccessToken's defaults, key order and omissions."""
    video: dict[str, Any] = {}
    for flag, key, _ in _ROOM_FLAGS:
        if getattr(args, _dest(flag)):
            video[key] = True
    if args.room:
        video["room"] = args.room
    if args.destination_room:
        video["destinationRoom"] = args.destination_room
    for dest, key, *_ in _DEFAULT_TRUE:
        value = getattr(args, dest)
        video[key] = True if value is None else bool(value)
    if args.can_publish_sources is not None:
        video["canPublishSources"] = list(dict.fromkeys(args.can_publish_sources))
    for flag, key, _ in _OPTIONAL_FLAGS:
        if getattr(args, _dest(flag)):
            video[key] = True
    return video


def cmd_create_token(args: argparse.Namespace) -> int:
    if args.join and (not args.identity or not args.room):
        raise UsageError("--join needs both --identity and --room")
    if (args.admin or args.record) and not args.room:
        print("note: --admin/--record without --room grant nothing on any room "
              "(--admin alone is a node operator's token, for /admin/drain)", file=sys.stderr)
    api_key, api_secret = resolve_credentials(args)
    video = video_grant(args)
    token = mint_token(
        api_key,
        api_secret,
        identity=args.identity,
        ttl_seconds=args.valid_for,
        video=video,
        name=args.name,
        metadata=args.metadata,
        attributes=dict(args.attribute),
        kind=args.kind,
    )
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=args.valid_for)
    print(f"identity:  {args.identity or '(none)'}", file=sys.stderr)
    print(f"room:      {args.room or '(any)'}", file=sys.stderr)
    print(f"grants:    {json.dumps(video, separators=(',', ':'))}", file=sys.stderr)
    print(f"valid for: {format_duration(args.valid_for)} (until {expires:%Y-%m-%dT%H:%M:%SZ})", file=sys.stderr)
    print(token)
    return 0


# ---------------------------------------------------------------------------------------------
# braid room list|create|delete
# ---------------------------------------------------------------------------------------------


def add_room_commands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    room = subparsers.add_parser("room", help="list, create and delete rooms (RoomService API)",
                                 description="Manage rooms through the RoomService API; results are printed as JSON.")
    sub = room.add_subparsers(dest="room_command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list active rooms")
    add_server_args(p)
    p.add_argument("--names", action="extend", type=parse_names, default=[], metavar="A,B",
                   help="only these rooms (comma-separated, repeatable)")
    p.set_defaults(handler=cmd_room_list, prog=p.prog)

    p = sub.add_parser("create", help="create a room")
    add_server_args(p)
    p.add_argument("name", help="room name")
    p.add_argument("--empty-timeout", type=non_negative_int, metavar="SECONDS",
                   help="how long the room waits for its first participant")
    p.add_argument("--departure-timeout", type=non_negative_int, metavar="SECONDS",
                   help="how long the room lingers after the last participant left")
    p.add_argument("--max-participants", type=non_negative_int, metavar="N", help="0 means no limit")
    p.add_argument("--metadata", help="room metadata")
    p.set_defaults(handler=cmd_room_create, prog=p.prog)

    p = sub.add_parser("delete", help="delete a room, disconnecting everyone in it")
    add_server_args(p)
    p.add_argument("name", help="room name")
    p.set_defaults(handler=cmd_room_delete, prog=p.prog)

    from braid.cli_admin import add_participant_commands

    add_participant_commands(sub)


def call_api(args: argparse.Namespace, call: Callable[[Any], Awaitable[T]]) -> T:
    """Run `call(LiveKitAPI)` against the server of `args`, turning failures into one-line CLIErrors."""
    import aiohttp
    from google.protobuf.message import DecodeError
    from livekit import api

    url = resolve_url(args)
    api_key, api_secret = resolve_credentials(args)

    async def run() -> T:
        lkapi = api.LiveKitAPI(url, api_key, api_secret, timeout=aiohttp.ClientTimeout(total=args.timeout),
                               failover=False)
        try:
            # Our own deadline: livekit-api 1.2.2 passes timeout=None per request, which aiohttp
            # reads as "no timeout", so the session's timeout alone does not apply.
            return await asyncio.wait_for(call(lkapi), args.timeout)
        finally:
            await lkapi.aclose()

    try:
        return asyncio.run(run())
    except api.ServerError as exc:
        if exc.code == "unknown" and not exc.message:  # not a Twirp error body
            raise CLIError(f"unexpected HTTP {exc.status} from {url}: is it a Braid or LiveKit server?") from None
        raise CLIError(f"{exc.code}: {exc.message or f'HTTP {exc.status}'}") from None
    except aiohttp.ClientConnectorError as exc:
        reason = "connection refused" if isinstance(exc.os_error, ConnectionRefusedError) else str(exc.os_error)
        raise CLIError(f"cannot reach Braid at {url} ({reason})") from None
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        raise CLIError(f"no answer from Braid at {url} within {args.timeout:g} s") from None
    except aiohttp.InvalidURL:
        raise UsageError(f"invalid --url {url!r}") from None
    except aiohttp.ClientError as exc:
        raise CLIError(f"request to Braid at {url} failed: {str(exc) or type(exc).__name__}") from None
    except DecodeError:
        raise CLIError(f"unexpected answer from {url}: is it a Braid or LiveKit server?") from None


def print_message(message: Any) -> None:
    from google.protobuf.json_format import MessageToJson

    print(MessageToJson(message, preserving_proto_field_name=True, ensure_ascii=False))


def cmd_room_list(args: argparse.Namespace) -> int:
    from livekit.protocol.room import ListRoomsRequest

    request = ListRoomsRequest(names=list(dict.fromkeys(args.names)))
    print_message(call_api(args, lambda lk: lk.room.list_rooms(request)))
    return 0


def cmd_room_create(args: argparse.Namespace) -> int:
    from livekit.protocol.room import CreateRoomRequest

    request = CreateRoomRequest(name=args.name)
    for field in ("empty_timeout", "departure_timeout", "max_participants", "metadata"):
        value = getattr(args, field)
        if value is not None:
            setattr(request, field, value)
    print_message(call_api(args, lambda lk: lk.room.create_room(request)))
    return 0


def cmd_room_delete(args: argparse.Namespace) -> int:
    from livekit.protocol.room import DeleteRoomRequest

    request = DeleteRoomRequest(room=args.name)
    print_message(call_api(args, lambda lk: lk.room.delete_room(request)))
    print(f"deleted room {args.name}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# Command registry and entry point
# ---------------------------------------------------------------------------------------------

# Each entry adds one top-level command (or group) to `braid`; order is the order in --help.
# To add one (e.g. `join-room` from braid/clients/), write `add_…_command(subparsers)` in your own
# module and append it here. Set `handler` (args -> exit status) and, for error messages,
# `prog=<your parser>.prog` with `set_defaults`; raise `CLIError` for a one-line failure.
def add_join_room(subparsers) -> None:
    from braid.clients.join_room import add_join_room_command

    add_join_room_command(subparsers)


def add_admin_commands(subparsers) -> None:
    from braid.cli_admin import add_dispatch_commands, add_send_data_command

    from braid.clients.load_test import add_load_test_command

    add_dispatch_commands(subparsers)
    add_send_data_command(subparsers)
    add_load_test_command(subparsers)


COMMAND_GROUPS: list[CommandGroup] = [
    add_create_token_command,
    add_room_commands,
    add_admin_commands,
    add_join_room,
]


def build_parser(groups: Sequence[CommandGroup] | None = None) -> argparse.ArgumentParser:
    from braid import __version__

    parser = argparse.ArgumentParser(
        prog="braid",
        description="Braid command-line tool: access tokens and the RoomService API of a Braid (or LiveKit) server.",
    )
    parser.add_argument("--version", action="version", version=f"braid {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMAND_GROUPS if groups is None else groups:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    prog = getattr(args, "prog", None) or f"braid {args.command}"
    try:
        return handler(args)
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
