"""Agents and RPC in a real cluster: routers, signal and media nodes as separate processes on a private Redis.

Each media node takes one participant, so the caller, the callee and the agent each sit on their own media node.
A livekit-agents worker connected to one signal node serves a room joined through the other; when it is killed
its job moves, once, to a worker on the other signal node (two routers run, one offers it).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from livekit import api

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .agents.harness import agents_python, start_worker
from .cluster import KEY, SECRET, start_cluster, stop_cluster
from .test_agents_framework import _agents, _heard, _hears_echo, _status, _talk_to_agent

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def cluster(tmp_path, redis_server):
    agents_python()
    c = start_cluster(tmp_path, redis_server, media_regions=("eu-west", "us-east", "eu-west", "us-east"),
                      media_env={"BRAID_LIMITS__MAX_PARTICIPANTS": "1"}, routers=2, port_base=54400)
    yield c
    stop_cluster(c)


async def test_rpc_and_agents_across_nodes(cluster, tmp_path, room_name):
    west, east = cluster.signal("eu-west"), cluster.signal("us-east")
    workers = [start_worker(tmp_path, node.server.ws_url, KEY, SECRET, "echo-cluster") for node in (west, east)]
    alice, bob = Observer("alice"), Observer("bob")
    lk = api.LiveKitAPI(east.server.http_url, KEY, SECRET)
    media = DemoMedia(frequency=440)
    try:
        await asyncio.gather(*(asyncio.to_thread(w.wait_registered, 90) for w in workers))
        west_worker, east_worker = workers
        east_worker.stop()  # first only the worker on the west signal node; the east one comes back later

        # Participant RPC between media nodes, both ways.
        await alice.connect(west.server.ws_url, join_token(KEY, SECRET, room_name, "alice"))
        await bob.connect(east.server.ws_url, join_token(KEY, SECRET, room_name, "bob"))
        assert await wait_until(lambda: sorted(cluster.media_hosting().values()) == [0, 0, 1, 1], 10)
        alice.room.local_participant.register_rpc_method("hello", lambda d: f"alice to {d.caller_identity}")
        bob.room.local_participant.register_rpc_method("hello", lambda d: f"bob to {d.caller_identity}")
        assert await wait_until(lambda: "alice" in {p.identity for p in bob.room.remote_participants.values()}, 10)
        assert await bob.room.local_participant.perform_rpc(destination_identity="alice", method="hello",
                                                            payload="") == "alice to bob"
        assert await alice.room.local_participant.perform_rpc(destination_identity="bob", method="hello",
                                                              payload="") == "bob to alice"
        reply = await lk.room._client.request("RoomService", "PerformRpc", api.PerformRpcRequest(
            room=room_name, destination_identity="alice", method="hello", payload=""),
            lk.room._auth_header(api.VideoGrants(room_admin=True, room=room_name)), api.PerformRpcResponse)
        assert reply.payload.startswith("alice to ")  # as in LiveKit, the caller is named by the request id

        # An agent dispatched through the east edge, its worker on the west edge, on a third media node.
        await media.start(bob.room)
        await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="echo-cluster", room=room_name))
        agent, status = await _talk_to_agent(bob, 440, "echo-cluster")
        assert status["pid"] == west_worker.proc.pid
        assert await wait_until(lambda: sorted(cluster.media_hosting().values()) == [0, 1, 1, 1], 10)

        # The worker dies mid-job: a worker on the other signal node takes the job over, once.
        replacement = start_worker(tmp_path, east.server.ws_url, KEY, SECRET, "echo-cluster")
        workers.append(replacement)
        await asyncio.to_thread(replacement.wait_registered, 90)
        west_worker.kill()
        killed_at = time.monotonic()
        moved = False
        while time.monotonic() - killed_at < 40 and not moved:
            for candidate in _agents(bob, "echo-cluster"):
                try:
                    moved = (await _status(bob, candidate.identity))["pid"] == replacement.proc.pid
                except Exception:
                    pass
            await asyncio.sleep(0.5)
        assert moved, cluster.logs()[-8000:]
        since = _heard(bob, agent)
        assert await wait_until(lambda: _hears_echo(bob, agent, 440, after=since), 20)
        listed = await lk.agent_dispatch.list_dispatch(room_name)
        jobs = [j for d in listed for j in d.state.jobs if d.agent_name == "echo-cluster"]
        assert len(jobs) == 1 and jobs[0].state.participant_identity == agent
        offers = sum(node.server.log().count("offering it again") for node in [cluster.router, *cluster.spare_routers])
        assert offers == 1
    finally:
        await media.stop()
        await lk.aclose()
        await alice.close()
        await bob.close()
        for worker in workers:
            worker.stop()
