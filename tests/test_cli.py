"""The `braid` CLI: create-token against livekit-api's AccessToken, duration parsing, bad input, room commands.

The `room` tests at the bottom run against the `dev_server` fixture (tests/conftest.py); the others use an
in-test fake Twirp endpoint or no server at all.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
from typing import Any, AsyncIterator, Callable

import jwt
import pytest
from aiohttp import web
from livekit import api
from livekit.protocol import models
from livekit.protocol import room as room_pb

from braid import cli

KEY, SECRET = "clikey", "cli-secret-long-enough-for-hs256-signatures"
ENV_VARS = (
    "BRAID_API_KEY", "BRAID_API_SECRET", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "BRAID_URL", "LIVEKIT_URL",
    "LIVEKIT_TOKEN",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run `braid ARGV…` in-process: (exit status, stdout, stderr)."""

    def run_cli(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse usage errors and --help
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run_cli


async def arun(run: Run, *argv: str) -> tuple[int, str, str]:
    """`run` from an async test: the CLI starts its own event loop, so give it a thread."""
    return await asyncio.to_thread(run, *argv)


def payload(token: str, secret: str = SECRET) -> dict[str, Any]:
    return jwt.decode(token, secret, algorithms=["HS256"], options={"verify_aud": False})


def without_times(claims: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k not in ("nbf", "exp")}


# -------------------------------------------------------------------------------------------------
# create-token
# -------------------------------------------------------------------------------------------------

SDK = api.AccessToken  # shorthand


CASES: list[tuple[str, list[str], Callable[[], api.AccessToken], int]] = [
    (
        "getting-started join",
        ["--join", "--room", "my-room", "--identity", "user1", "--valid-for", "24h"],
        lambda: SDK(KEY, SECRET).with_identity("user1")
        .with_grants(api.VideoGrants(room_join=True, room="my-room")),
        24 * 3600,
    ),
    (
        "admin grants",
        ["--admin", "--create", "--list", "--record", "--room", "r1", "--valid-for", "10m"],
        lambda: SDK(KEY, SECRET).with_grants(
            api.VideoGrants(room_admin=True, room_create=True, room_list=True, room_record=True, room="r1")
        ),
        600,
    ),
    (
        "participant details and restricted permissions",
        [
            "--join", "--room", "r2", "--identity", "bob", "--name", "Bob", "--metadata", '{"a":1}',
            "--attribute", "team=blue", "--attribute", "eq=x=y", "--kind", "agent",
            "--no-publish", "--no-publish-data", "--can-subscribe",
            "--can-publish-sources", "camera,microphone", "--can-update-own-metadata", "--hidden",
            "--valid-for", "1h30m",
        ],
        lambda: SDK(KEY, SECRET).with_identity("bob").with_name("Bob").with_metadata('{"a":1}')
        .with_attributes({"team": "blue", "eq": "x=y"}).with_kind("agent")
        .with_grants(api.VideoGrants(
            room_join=True, room="r2", can_publish=False, can_publish_data=False, can_subscribe=True,
            can_publish_sources=["camera", "microphone"], can_update_own_metadata=True, hidden=True,
        )),
        5400,
    ),
    (
        "every other grant",
        [
            "--identity", "svc", "--ingress-admin", "--recorder", "--agent", "--can-manage-agent-session",
            "--can-subscribe-metrics", "--no-subscribe", "--destination-room", "elsewhere", "--room", "here",
            "--allow-source", "screen_share", "--allow-source", "SCREEN_SHARE_AUDIO", "--valid-for", "90s",
        ],
        lambda: SDK(KEY, SECRET).with_identity("svc").with_grants(api.VideoGrants(
            ingress_admin=True, recorder=True, agent=True, can_manage_agent_session=True,
            can_subscribe_metrics=True, can_subscribe=False, destination_room="elsewhere", room="here",
            can_publish_sources=["screen_share", "screen_share_audio"],
        )),
        90,
    ),
    (
        "no grant flags: AccessToken's default VideoGrants, 6h",
        ["--identity", "plain"],
        lambda: SDK(KEY, SECRET).with_identity("plain").with_grants(api.VideoGrants()),
        6 * 3600,
    ),
]


@pytest.mark.parametrize("argv, expected, ttl", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_create_token_matches_access_token(
    run: Run, argv: list[str], expected: Callable[[], api.AccessToken], ttl: int
) -> None:
    code, out, err = run("create-token", "--api-key", KEY, "--api-secret", SECRET, *argv)
    assert code == 0, err
    token = out.strip()
    assert "\n" not in token, "stdout holds the token only"

    sdk_token = expected().with_ttl(datetime.timedelta(seconds=ttl)).to_jwt()
    ours, theirs = payload(token), payload(sdk_token)
    assert without_times(ours) == without_times(theirs)
    assert list(ours) == list(theirs), "same claims in the same order"
    assert list(ours.get("video", {})) == list(theirs.get("video", {}))
    assert ours["exp"] - ours["nbf"] == ttl
    assert jwt.get_unverified_header(token) == jwt.get_unverified_header(sdk_token)

    # And the SDK's own verifier accepts it.
    claims = api.TokenVerifier(KEY, SECRET).verify(token)
    assert claims.identity == ours["sub"]


def test_create_token_prints_identity_and_room_to_stderr(run: Run) -> None:
    code, out, err = run("create-token", "--api-key", KEY, "--api-secret", SECRET,
                         "--join", "--room", "my-room", "--identity", "user1")
    assert code == 0
    assert "user1" in err and "my-room" in err and "roomJoin" in err
    assert "user1" not in out.split(".")[0]  # stdout is just the JWT


def test_credentials_from_environment(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEKIT_API_KEY", "lkkey")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "lk-secret-0123456789-0123456789-abcd")
    code, out, err = run("create-token", "--identity", "a")
    assert code == 0, err
    assert api.TokenVerifier("lkkey", "lk-secret-0123456789-0123456789-abcd").verify(out.strip()).identity == "a"

    monkeypatch.setenv("BRAID_API_KEY", "braidkey")
    monkeypatch.setenv("BRAID_API_SECRET", "braid-secret-0123456789-0123456789-ab")
    code, out, _ = run("create-token", "--identity", "a")
    assert payload(out.strip(), "braid-secret-0123456789-0123456789-ab")["iss"] == "braidkey"

    code, out, _ = run("create-token", "--identity", "a", "--api-key", KEY, "--api-secret", SECRET)
    assert payload(out.strip())["iss"] == KEY, "flags beat the environment"


def test_dev_keys_are_the_fallback_with_a_note(run: Run) -> None:
    code, out, err = run("create-token", "--identity", "a", "--list")
    assert code == 0
    assert "devkey" in err and "note" in err
    assert api.TokenVerifier("devkey", "secret").verify(out.strip()).video.room_list is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--api-key", "k"], "--api-secret is required"),
        (["--api-secret", "s"], "--api-key is required"),
        (["--join", "--room", "r"], "--join needs both --identity and --room"),
        (["--join", "--identity", "u"], "--join needs both --identity and --room"),
        (["--valid-for", "5x"], "invalid duration '5x'"),
        (["--valid-for", "0s"], "at least 1s"),
        (["--attribute", "novalue"], "invalid attribute 'novalue' (use key=value)"),
        (["--attribute", "=v"], "invalid attribute"),
        (["--can-publish-sources", "camera,webcam"], "invalid track source 'webcam'"),
        (["--kind", "robot"], "invalid choice: 'robot'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_create_token_bad_input(run: Run, argv: list[str], message: str) -> None:
    code, out, err = run("create-token", *argv)
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("10m", 600), ("24h", 86400), ("1h30m", 5400), ("1h30m15s", 5415), ("1.5h", 5400),
     ("300", 300), (" 2M ", 120), ("0.5m", 30)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "h", "10m5", "-5s", "0s", "1d", "m10", "1h 30m", "0", "0.4s", "s5"])
def test_parse_duration_rejects(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_duration(text)


@pytest.mark.parametrize("seconds, text", [(90, "1m30s"), (600, "10m"), (86400, "24h"), (5400, "1h30m"), (5, "5s")])
def test_format_duration(seconds: int, text: str) -> None:
    assert cli.format_duration(seconds) == text
    assert cli.parse_duration(text) == seconds


# -------------------------------------------------------------------------------------------------
# URL and registry helpers
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://localhost:7880", "http://localhost:7880"),
        ("ws://localhost:7880/", "http://localhost:7880"),
        ("wss://braid.example.com", "https://braid.example.com"),
        ("WS://h:1", "http://h:1"),
        ("localhost:7880", "http://localhost:7880"),
        (None, "http://localhost:7880"),
    ],
)
def test_resolve_url(given: str | None, expected: str) -> None:
    import argparse

    assert cli.resolve_url(argparse.Namespace(url=given)) == expected


def test_resolve_url_env_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("LIVEKIT_URL", "wss://lk.example")
    assert cli.resolve_url(argparse.Namespace(url=None)) == "https://lk.example"
    monkeypatch.setenv("BRAID_URL", "ws://braid.example")
    assert cli.resolve_url(argparse.Namespace(url=None)) == "http://braid.example"
    with pytest.raises(cli.UsageError):
        cli.resolve_url(argparse.Namespace(url="ftp://x"))


def test_registry_is_extensible(run: Run) -> None:
    def add_hello(subparsers: Any) -> None:
        p = subparsers.add_parser("hello")
        cli.add_server_args(p)
        p.set_defaults(handler=lambda args: print(cli.resolve_url(args)) or 0, prog=p.prog)

    parser = cli.build_parser([*cli.COMMAND_GROUPS, add_hello])
    args = parser.parse_args(["hello", "--url", "ws://h:1"])
    assert args.handler(args) == 0
    code, out, _ = run("--help")
    assert code == 0 and "create-token" in out and "room" in out


def test_no_command_is_a_usage_error(run: Run) -> None:
    code, _, err = run()
    assert code == 2 and "COMMAND" in err


# -------------------------------------------------------------------------------------------------
# room commands against a fake Twirp endpoint (error mapping, request shape)
# -------------------------------------------------------------------------------------------------


class FakeTwirp:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.reply: Callable[[str, bytes], web.StreamResponse] = self.ok
        self.url = ""

    @staticmethod
    def ok(method: str, body: bytes) -> web.StreamResponse:
        if method == "ListRooms":
            rooms = room_pb.ListRoomsResponse(rooms=[
                models.Room(name="r1", sid="RM_abc", empty_timeout=300, creation_time=1700000000, num_participants=2),
            ])
            return web.Response(body=rooms.SerializeToString(), content_type="application/protobuf")
        if method == "CreateRoom":
            req = room_pb.CreateRoomRequest.FromString(body)
            room = models.Room(name=req.name, sid="RM_new", empty_timeout=req.empty_timeout,
                               departure_timeout=req.departure_timeout, max_participants=req.max_participants,
                               metadata=req.metadata)
            return web.Response(body=room.SerializeToString(), content_type="application/protobuf")
        return web.Response(body=b"", content_type="application/protobuf")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        body = await request.read()
        self.requests.append((method, dict(request.headers), body))
        result = self.reply(method, body)
        if asyncio.iscoroutine(result):
            return await result
        return result


@pytest.fixture
async def fake_twirp() -> AsyncIterator[FakeTwirp]:
    fake = FakeTwirp()
    app = web.Application()
    app.router.add_post("/twirp/livekit.RoomService/{method}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield fake
    await runner.cleanup()


def creds() -> list[str]:
    return ["--api-key", KEY, "--api-secret", SECRET]


async def test_room_list_prints_snake_case_json(run: Run, fake_twirp: FakeTwirp) -> None:
    ws_url = fake_twirp.url.replace("http://", "ws://")
    code, out, err = await arun(run, "room", "list", "--url", ws_url, *creds(), "--names", "r1,r2", "--names", "r3")
    assert code == 0, err
    result = json.loads(out)
    assert result["rooms"][0]["empty_timeout"] == 300
    assert result["rooms"][0]["creation_time"] == "1700000000"
    assert result["rooms"][0]["num_participants"] == 2
    method, headers, body = fake_twirp.requests[0]
    assert method == "ListRooms"
    assert list(room_pb.ListRoomsRequest.FromString(body).names) == ["r1", "r2", "r3"]
    token = headers["Authorization"].removeprefix("Bearer ")
    assert payload(token)["video"]["roomList"] is True


async def test_room_create_sends_options(run: Run, fake_twirp: FakeTwirp) -> None:
    code, out, err = await arun(
        run, "room", "create", "big", "--url", fake_twirp.url, *creds(), "--empty-timeout", "60",
        "--departure-timeout", "5", "--max-participants", "10", "--metadata", "hi",
    )
    assert code == 0, err
    req = room_pb.CreateRoomRequest.FromString(fake_twirp.requests[0][2])
    assert (req.name, req.empty_timeout, req.departure_timeout, req.max_participants, req.metadata) == (
        "big", 60, 5, 10, "hi")
    created = json.loads(out)
    assert created["name"] == "big" and created["max_participants"] == 10 and created["departure_timeout"] == 5


async def test_room_delete(run: Run, fake_twirp: FakeTwirp) -> None:
    code, out, err = await arun(run, "room", "delete", "gone", "--url", fake_twirp.url, *creds())
    assert code == 0, err
    assert json.loads(out) == {}
    assert room_pb.DeleteRoomRequest.FromString(fake_twirp.requests[0][2]).room == "gone"
    assert "deleted room gone" in err


async def test_twirp_error_is_one_line(run: Run, fake_twirp: FakeTwirp) -> None:
    fake_twirp.reply = lambda m, b: web.json_response({"code": "not_found", "msg": "room not found"}, status=404)
    code, out, err = await arun(run, "room", "delete", "nope", "--url", fake_twirp.url, *creds())
    assert (code, out) == (1, "")
    assert err.strip() == "braid room delete: error: not_found: room not found"


async def test_non_twirp_answer(run: Run, fake_twirp: FakeTwirp) -> None:
    fake_twirp.reply = lambda m, b: web.Response(status=404, text="<html>not here</html>", content_type="text/html")
    code, _, err = await arun(run, "room", "list", "--url", fake_twirp.url, *creds())
    assert code == 1
    assert "unexpected HTTP 404" in err and len(err.strip().splitlines()) == 1


async def test_slow_server_times_out(run: Run, fake_twirp: FakeTwirp) -> None:
    async def slow(method: str, body: bytes) -> web.StreamResponse:
        await asyncio.sleep(3)
        return web.Response()

    fake_twirp.reply = slow  # type: ignore[assignment]
    code, _, err = await arun(run, "room", "list", "--url", fake_twirp.url, *creds(), "--timeout", "0.3")
    assert code == 1
    assert "no answer from Braid at" in err


def test_connection_refused(run: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run("room", "list", "--url", f"ws://127.0.0.1:{port}", *creds())
    assert (code, out) == (1, "")
    assert f"cannot reach Braid at http://127.0.0.1:{port}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["room", "create", "r", "--empty-timeout", "-1"], "is negative"),
        (["room", "create", "r", "--max-participants", "many"], "invalid number 'many'"),
        (["room", "create"], "the following arguments are required: name"),
        (["room", "list", "--url", "ftp://x"], "invalid --url"),
        (["room"], "required"),
    ],
)
def test_room_bad_input(run: Run, argv: list[str], message: str) -> None:
    code, _, err = run(*argv)
    assert code == 2
    assert message in err


# -------------------------------------------------------------------------------------------------
# room commands against the real dev server (the `dev_server` fixture in tests/conftest.py)
# -------------------------------------------------------------------------------------------------


def server_args(server: Any, url: str | None = None) -> list[str]:
    return ["--url", url or server.http_url, "--api-key", server.api_key, "--api-secret", server.api_secret]


def test_room_create_list_delete_against_dev_server(run: Run, dev_server: Any, room_name: str) -> None:
    code, out, err = run("room", "create", room_name, *server_args(dev_server), "--empty-timeout", "120",
                         "--max-participants", "7", "--metadata", "from the cli")
    assert code == 0, err
    created = json.loads(out)
    assert created["name"] == room_name and created["sid"].startswith("RM_")
    assert (created["empty_timeout"], created["max_participants"], created["metadata"]) == (120, 7, "from the cli")

    ws_url = dev_server.http_url.replace("http://", "ws://")
    code, out, err = run("room", "list", *server_args(dev_server, ws_url), "--names", room_name)
    assert code == 0, err
    assert [r["name"] for r in json.loads(out)["rooms"]] == [room_name]

    code, out, err = run("room", "delete", room_name, *server_args(dev_server))
    assert code == 0, err

    code, out, err = run("room", "list", *server_args(dev_server), "--names", room_name)
    assert code == 0, err
    assert json.loads(out).get("rooms", []) == []


def test_room_commands_with_env_credentials(run: Run, dev_server: Any, room_name: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEKIT_URL", dev_server.http_url)
    monkeypatch.setenv("LIVEKIT_API_KEY", dev_server.api_key)
    monkeypatch.setenv("LIVEKIT_API_SECRET", dev_server.api_secret)
    code, out, err = run("room", "create", room_name)
    assert code == 0, err
    assert "note" not in err
    code, out, err = run("room", "delete", room_name)
    assert code == 0, err


def test_room_wrong_secret_against_dev_server(run: Run, dev_server: Any) -> None:
    code, out, err = run("room", "list", "--url", dev_server.http_url, "--api-key", dev_server.api_key,
                         "--api-secret", "not-the-secret-0123456789-0123456789")
    assert (code, out) == (1, "")
    assert err.startswith("braid room list: error: unauthenticated: ")
    assert len(err.strip().splitlines()) == 1


def test_token_from_create_token_is_accepted_by_dev_server(run: Run, dev_server: Any) -> None:
    code, out, _ = run("create-token", "--api-key", dev_server.api_key, "--api-secret", dev_server.api_secret,
                       "--list", "--valid-for", "1m")
    assert code == 0

    async def list_with_token() -> int:
        lk = api.LiveKitAPI.with_token(out.strip(), dev_server.http_url)
        try:
            resp = await lk.room.list_rooms(api.ListRoomsRequest())
            return len(resp.rooms)
        finally:
            await lk.aclose()

    assert asyncio.run(list_with_token()) >= 0
