"""`braid dispatch`, `braid room participants`, `braid send-data` and `braid load-test` against a dev server."""

from __future__ import annotations

import asyncio
import json

import pytest

from braid.clients.harness import Observer, join_token, wait_until

from .test_cli import arun, clean_env, run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)


async def test_dispatch_participants_and_send_data(run, dev_server, room_name):  # noqa: F811
    server = ("--url", dev_server.http_url, "--api-key", dev_server.api_key, "--api-secret", dev_server.api_secret)
    code, out, err = await arun(run, "dispatch", "create", "--room", room_name, "--agent-name", "helper",
                                "--metadata", "m", *server)
    assert code == 0, err
    dispatch = json.loads(out)
    assert dispatch["agent_name"] == "helper" and dispatch["room"] == room_name
    code, out, _ = await arun(run, "dispatch", "list", "--room", room_name, *server)
    assert dispatch["id"] in [d["id"] for d in json.loads(out)["agent_dispatches"]]
    code, out, _ = await arun(run, "dispatch", "delete", dispatch["id"], "--room", room_name, *server)
    assert code == 0 and json.loads(out)["id"] == dispatch["id"]
    code, _, err = await arun(run, "dispatch", "delete", dispatch["id"], "--room", room_name, *server)
    assert code == 1 and "not_found" in err

    alice = Observer("alice")
    await alice.connect(dev_server.ws_url, join_token(dev_server.api_key, dev_server.api_secret, room_name, "alice"))
    try:
        code, out, _ = await arun(run, "room", "participants", "list", "--room", room_name, *server)
        assert [p["identity"] for p in json.loads(out)["participants"]] == ["alice"]
        code, out, _ = await arun(run, "room", "participants", "update", "alice", "--room", room_name,
                                  "--metadata", "vip", "--attribute", "team=blue", *server)
        assert code == 0 and json.loads(out)["metadata"] == "vip"
        code, out, _ = await arun(run, "room", "participants", "get", "alice", "--room", room_name, *server)
        assert json.loads(out)["attributes"] == {"team": "blue"}
        code, _, err = await arun(run, "room", "participants", "update", "alice", "--room", room_name, *server)
        assert code == 2 and "nothing to update" in err

        code, out, err = await arun(run, "send-data", "--room", room_name, "hello", "--topic", "news", *server)
        assert code == 0, err
        assert await wait_until(lambda: any(d.topic == "news" and d.data == b"hello" for d in alice.data), 10), [
            (d.topic, d.data) for d in alice.data]

        code, _, _ = await arun(run, "room", "participants", "remove", "alice", "--room", room_name, *server)
        assert code == 0
        assert await wait_until(lambda: alice.disconnect_reason is not None, 10)
    finally:
        await alice.close()


async def test_load_test_prints_a_summary(run, dev_server, room_name):  # noqa: F811
    code, out, err = await arun(run, "load-test", "--url", dev_server.ws_url, "--api-key", dev_server.api_key,
                                "--api-secret", dev_server.api_secret, "--room", room_name, "--publishers", "1",
                                "--subscribers", "2", "--duration", "3", "--size", "320x240")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line and not line.startswith("-")}
    assert rows["publisher"][1] == "1/1" and rows["subscriber"][1] == "2/2"
    assert float(rows["subscriber"][5]) > 20  # decoded audio frames per second per subscriber
    assert "joining" in err and "media" in err  # the progress bars
    await asyncio.sleep(0)
