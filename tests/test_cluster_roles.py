"""The same code path as the dev mode, split into processes: router and signal roles over gRPC and Redis."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from livekit import api

from .servers import free_port

KEYS = {"BRAID_KEYS": "clusterkey: a-cluster-secret-that-is-long-enough"}


async def test_roomservice_through_separate_signal_and_router(server_factory, redis_server, room_name):
    grpc_port = free_port()
    router = server_factory("--role", "router", "--redis", redis_server.address, "--grpc-port", str(grpc_port),
                            dev=False, env=KEYS)
    signal = server_factory("--role", "signal", "--redis", redis_server.address,
                            "--router-address", f"127.0.0.1:{grpc_port}", dev=False, env=KEYS)
    lk = api.LiveKitAPI(signal.http_url, "clusterkey", "a-cluster-secret-that-is-long-enough")
    try:
        created = await lk.room.create_room(api.CreateRoomRequest(name=room_name, metadata="m"))
        listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
        assert [r.sid for r in listed.rooms] == [created.sid]
        # Router state lives in Redis: a restarted router still knows the room.
        router.stop()
        router2 = server_factory("--role", "router", "--redis", redis_server.address,
                                 "--grpc-port", str(grpc_port), dev=False, env=KEYS)
        listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
        assert [r.metadata for r in listed.rooms] == ["m"]
        await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))
        assert not (await lk.room.list_rooms(api.ListRoomsRequest(names=[room_name]))).rooms
        async with aiohttp.ClientSession() as http:
            async with http.get(router2.http_url + "/healthz") as resp:
                assert resp.status == 200
    finally:
        await lk.aclose()


async def test_readiness_follows_redis(server_factory, redis_server):
    grpc_port = free_port()
    router = server_factory("--role", "router", "--redis", redis_server.address, "--grpc-port", str(grpc_port),
                            dev=False, env=KEYS)

    async def status(path: str) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.get(router.http_url + path) as resp:
                return resp.status

    assert await status("/readyz") == 200
    redis_server.stop()
    for _ in range(50):
        if await status("/readyz") == 503:
            break
        await asyncio.sleep(0.2)
    assert await status("/readyz") == 503
    assert await status("/healthz") == 200, "liveness never depends on Redis"
    redis_server.start()
    for _ in range(50):
        if await status("/readyz") == 200:
            break
        await asyncio.sleep(0.2)
    assert await status("/readyz") == 200


@pytest.mark.parametrize(
    "args,env,field",
    [
        (["--port", "99999"], {}, "port"),
        (["--role", "signal"], {}, "router_address"),
        ([], {"BRAID_KEYS": "justakey"}, "keys"),
        ([], {"BRAID_ROOM__EMPTY_TIMEOUT": "soon"}, "room.empty_timeout"),
    ],
)
async def test_invalid_config_names_the_field(tmp_path, args, env, field):
    import os
    import subprocess
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "braid.server", "--dev", *args,
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert f"invalid configuration: {field}" in out.decode(), out.decode()
