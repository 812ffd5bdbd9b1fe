"""RoomService over Twirp, driven by the official livekit-api client against a real server process."""

from __future__ import annotations

import asyncio
import datetime
import json
import time

import aiohttp
import jwt
import pytest
from livekit import api
from livekit.protocol import models
from livekit.protocol import room as room_pb

TWIRP = "/twirp/livekit.RoomService/"


@pytest.fixture
async def lkapi(dev_server):
    client = api.LiveKitAPI(dev_server.http_url, dev_server.api_key, dev_server.api_secret)
    yield client
    await client.aclose()


def token(server, ttl: int = 600, identity: str = "admin", **video) -> str:
    return (
        api.AccessToken(server.api_key, server.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(**video))
        .with_ttl(datetime.timedelta(seconds=ttl))
        .to_jwt()
    )


async def post(server, method: str, body: bytes, *, auth: str | None, content_type="application/protobuf"):
    headers = {"Content-Type": content_type}
    if auth is not None:
        headers["Authorization"] = f"Bearer {auth}"
    async with aiohttp.ClientSession() as session:
        async with session.post(server.http_url + TWIRP + method, data=body, headers=headers) as resp:
            return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def test_create_list_delete_rooms(lkapi, room_name):
    created = await lkapi.room.create_room(
        api.CreateRoomRequest(name=room_name, empty_timeout=120, max_participants=7, metadata="hello")
    )
    assert created.sid.startswith("RM_")
    assert (created.name, created.empty_timeout, created.max_participants, created.metadata) == (
        room_name, 120, 7, "hello",
    )
    again = await lkapi.room.create_room(api.CreateRoomRequest(name=room_name))
    assert again.sid == created.sid, "CreateRoom of an existing room returns that room"

    other = room_name + "-b"
    await lkapi.room.create_room(api.CreateRoomRequest(name=other))
    listed = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
    assert [r.name for r in listed.rooms] == [room_name]
    everything = {r.name for r in (await lkapi.room.list_rooms(api.ListRoomsRequest())).rooms}
    assert {room_name, other} <= everything

    updated = await lkapi.room.update_room_metadata(
        api.UpdateRoomMetadataRequest(room=room_name, metadata="changed")
    )
    assert updated.metadata == "changed" and updated.sid == created.sid

    await lkapi.room.delete_room(api.DeleteRoomRequest(room=room_name))
    await lkapi.room.delete_room(api.DeleteRoomRequest(room=other))
    names = {r.name for r in (await lkapi.room.list_rooms(api.ListRoomsRequest())).rooms}
    assert room_name not in names and other not in names


async def test_participant_methods_on_empty_and_unknown_rooms(lkapi, room_name):
    await lkapi.room.create_room(api.CreateRoomRequest(name=room_name))
    listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room_name))
    assert list(listed.participants) == []
    with pytest.raises(api.TwirpError) as err:
        await lkapi.room.get_participant(api.RoomParticipantIdentity(room=room_name, identity="nobody"))
    assert err.value.code == "not_found" and err.value.status == 404
    with pytest.raises(api.TwirpError) as err:
        await lkapi.room.remove_participant(api.RoomParticipantIdentity(room=room_name, identity="nobody"))
    assert err.value.code == "not_found"
    with pytest.raises(api.TwirpError) as err:
        await lkapi.room.list_participants(api.ListParticipantsRequest(room="no-such-room-" + room_name))
    assert err.value.code == "not_found"
    with pytest.raises(api.TwirpError) as err:
        await lkapi.room.delete_room(api.DeleteRoomRequest(room="no-such-room-" + room_name))
    assert err.value.code == "not_found"
    await lkapi.room.delete_room(api.DeleteRoomRequest(room=room_name))


async def test_forward_and_move_are_unimplemented(dev_server, room_name):
    admin = token(dev_server, room_admin=True, room=room_name, destination_room="elsewhere")
    for method, request in (
        ("ForwardParticipant", room_pb.ForwardParticipantRequest(room=room_name, identity="a", destination_room="b")),
        ("MoveParticipant", room_pb.MoveParticipantRequest(room=room_name, identity="a", destination_room="b")),
    ):
        status, body, _ = await post(dev_server, method, request.SerializeToString(), auth=admin)
        assert status == 501 and json.loads(body)["code"] == "unimplemented"


async def test_json_requests_answer_snake_case_with_defaults(dev_server, room_name):
    creator = token(dev_server, room_create=True)
    body = json.dumps({"name": room_name, "emptyTimeout": 30}).encode()
    status, raw, ctype = await post(dev_server, "CreateRoom", body, auth=creator, content_type="application/json")
    assert status == 200 and ctype.startswith("application/json")
    room = json.loads(raw)
    assert room["name"] == room_name and room["empty_timeout"] == 30
    assert room["num_participants"] == 0 and room["metadata"] == "", "defaults are emitted"
    assert "creation_time_ms" in room
    lister = token(dev_server, room_list=True)
    status, raw, _ = await post(
        dev_server, "ListRooms", json.dumps({"names": [room_name]}).encode(), auth=lister,
        content_type="application/json",
    )
    assert [r["name"] for r in json.loads(raw)["rooms"]] == [room_name]
    status, _, _ = await post(
        dev_server, "DeleteRoom", json.dumps({"room": room_name}).encode(), auth=creator,
        content_type="application/json",
    )
    assert status == 200


def _forged(server) -> str:
    return jwt.encode({"iss": server.api_key, "sub": "", "exp": int(time.time()) + 600,
                       "video": {"roomList": True}}, "not-the-secret", algorithm="HS256")


@pytest.mark.parametrize(
    "case,status,code",
    [
        ("no token", 401, "unauthenticated"),
        ("forged signature", 401, "unauthenticated"),
        ("expired", 401, "unauthenticated"),
        ("not yet valid", 401, "unauthenticated"),
        ("unknown key", 401, "unauthenticated"),
        ("missing grant", 403, "permission_denied"),
    ],
)
async def test_bad_tokens_are_refused(dev_server, case, status, code):
    now = int(time.time())
    base = {"iss": dev_server.api_key, "sub": "", "video": {"roomList": True}}
    auth = {
        "no token": None,
        "forged signature": _forged(dev_server),
        "expired": jwt.encode({**base, "nbf": now - 3600, "exp": now - 120}, dev_server.api_secret, algorithm="HS256"),
        "not yet valid": jwt.encode({**base, "nbf": now + 600, "exp": now + 1200}, dev_server.api_secret, algorithm="HS256"),
        "unknown key": jwt.encode({**base, "iss": "who", "exp": now + 600}, dev_server.api_secret, algorithm="HS256"),
        "missing grant": token(dev_server, room_join=True, room="r"),
    }[case]
    got, body, _ = await post(dev_server, "ListRooms", b"", auth=auth)
    error = json.loads(body)
    assert (got, error["code"]) == (status, code), error
    assert error["msg"] and "meta" in error


async def test_room_scoped_admin_grant(dev_server, room_name, lkapi):
    await lkapi.room.create_room(api.CreateRoomRequest(name=room_name))
    wrong_room = token(dev_server, room_admin=True, room="some-other-room")
    request = room_pb.ListParticipantsRequest(room=room_name).SerializeToString()
    status, body, _ = await post(dev_server, "ListParticipants", request, auth=wrong_room)
    assert status == 403 and json.loads(body)["code"] == "permission_denied"
    no_admin = token(dev_server, room=room_name, room_join=True)
    status, body, _ = await post(dev_server, "ListParticipants", request, auth=no_admin)
    assert status == 403
    right = token(dev_server, room_admin=True, room=room_name)
    status, body, _ = await post(dev_server, "ListParticipants", request, auth=right)
    assert status == 200
    creator_only = token(dev_server, room_list=True)
    status, body, _ = await post(dev_server, "CreateRoom", room_pb.CreateRoomRequest(name="x").SerializeToString(),
                                 auth=creator_only)
    assert status == 403 and "roomCreate" in json.loads(body)["msg"]
    await lkapi.room.delete_room(api.DeleteRoomRequest(room=room_name))


async def test_malformed_requests_and_unknown_methods(dev_server, lkapi):
    lister = token(dev_server, room_list=True, room_create=True)
    status, body, _ = await post(dev_server, "ListRooms", b"\xff\xff\xff\x0f garbage", auth=lister)
    assert (status, json.loads(body)["code"]) == (400, "malformed")
    status, body, _ = await post(dev_server, "CreateRoom", b"{not json", auth=lister, content_type="application/json")
    assert (status, json.loads(body)["code"]) == (400, "malformed")
    status, body, _ = await post(dev_server, "NoSuchMethod", b"", auth=lister)
    assert (status, json.loads(body)["code"]) == (404, "bad_route")
    status, body, _ = await post(dev_server, "ListRooms", b"", auth=lister, content_type="text/plain")
    assert (status, json.loads(body)["code"]) == (404, "bad_route")
    status, body, _ = await post(dev_server, "CreateRoom", room_pb.CreateRoomRequest(name="").SerializeToString(),
                                 auth=lister)
    assert (status, json.loads(body)["code"]) == (400, "invalid_argument")
    huge = b"\x0a" + b"\xff" * (10 * 1024 * 1024)
    status, body, _ = await post(dev_server, "CreateRoom", huge, auth=lister)
    assert status == 413 and json.loads(body)["code"] == "malformed"
    # The server kept serving through all of it.
    assert isinstance(await lkapi.room.list_rooms(api.ListRoomsRequest()), room_pb.ListRoomsResponse)


async def test_health_and_readiness_are_separate(dev_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(dev_server.http_url + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(dev_server.http_url + "/readyz") as resp:
            assert resp.status == 200


async def test_room_webhooks_verify_with_webhook_receiver(dev_server, webhook_sink, lkapi, room_name):
    room = await lkapi.room.create_room(api.CreateRoomRequest(name=room_name))
    await lkapi.room.delete_room(api.DeleteRoomRequest(room=room_name))
    deliveries = await asyncio.to_thread(
        webhook_sink.wait_for,
        lambda d: d.event.get("room", {}).get("name") == room_name and d.event["event"] == "room_finished",
    )
    assert deliveries
    receiver = api.WebhookReceiver(api.TokenVerifier(dev_server.api_key, dev_server.api_secret))
    events = [receiver.receive(d.body, d.authorization) for d in webhook_sink.for_room(room_name)]
    assert [e.event for e in events] == ["room_started", "room_finished"]
    assert all(e.room.sid == room.sid and e.id.startswith("EV_") and e.created_at > 0 for e in events)
    assert len({e.id for e in events}) == 2
    assert all(d.content_type == "application/webhook+json" for d in webhook_sink.for_room(room_name))
    assert not any(d.authorization.startswith("Bearer") for d in webhook_sink.for_room(room_name))


async def test_empty_timeout_closes_unused_room(dev_server, webhook_sink, lkapi, room_name):
    await lkapi.room.create_room(api.CreateRoomRequest(name=room_name, empty_timeout=1))
    finished = await asyncio.to_thread(
        webhook_sink.wait_for,
        lambda d: d.event.get("room", {}).get("name") == room_name and d.event["event"] == "room_finished",
        8.0,
    )
    assert finished, "room_finished after empty_timeout"
    rooms = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
    assert list(rooms.rooms) == []
