"""The real livekit-agents framework (PyPI, in its own .venv-agents) against Braid: workers with a small
entrypoint and no cloud plugins (tests/agents/echo_worker.py) register on `/agent`, are dispatched by token, by
AgentDispatchService and automatically, join as AGENT participants, hear a participant's audio and play it back,
answer RPC, and a job whose worker is killed moves to another worker."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from livekit import api, rtc

from braid.clients.harness import Observer, wait_until
from braid.clients.media import DemoMedia, dominant_frequency

from .agents.harness import AgentWorker, agents_python, start_worker
from .servers import start_server

pytestmark = pytest.mark.timeout(180)

AGENT_KIND = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory):
    """A private dev server: a worker without an agent name gets a job for every room created on it."""
    agents_python()
    server = start_server(tmp_path_factory.mktemp("agents-server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, agent_server) -> dict[str, list[AgentWorker]]:
    """The module's workers, started together (each takes seconds to import the framework): one named for
    token dispatch, one without a name, two sharing a name for the dispatch API and the kill, one publisher
    worker (a job per participant that publishes)."""
    tmp = tmp_path_factory.mktemp("agent-workers")
    names = {"token": ["echo-token"], "unnamed": [""], "api": ["echo-api", "echo-api"], "publisher": ["echo-pub"]}
    started = {role: [start_worker(tmp, agent_server.ws_url, agent_server.api_key, agent_server.api_secret, name,
                                   "publisher" if role == "publisher" else "room")
                      for name in agent_names] for role, agent_names in names.items()}
    try:
        for workers in started.values():
            for worker in workers:
                worker.wait_registered(90)
        yield started
    finally:
        for workers in started.values():
            for worker in workers:
                worker.stop()


def _user_token(server, room: str, identity: str, agents: list[api.RoomAgentDispatch] | None = None) -> str:
    token = (api.AccessToken(server.api_key, server.api_secret).with_identity(identity)
             .with_grants(api.VideoGrants(room_join=True, room=room)))
    if agents:
        token = token.with_room_config(api.RoomConfiguration(agents=agents))
    return token.to_jwt()


def _agents(obs: Observer, agent_name: str | None = None) -> list[rtc.RemoteParticipant]:
    """The room's AGENT participants (of one agent name: the attribute the server gives them)."""
    return [p for p in obs.room.remote_participants.values() if p.kind == AGENT_KIND
            and (agent_name is None or p.attributes.get("lk.agent_name") == agent_name)]


def _heard(obs: Observer, identity: str) -> int:
    got = obs.received.get(identity)
    return 0 if got is None else len(got.audio())


def _hears_echo(obs: Observer, identity: str, freq: float, after: int = 0) -> bool:
    """A second of `freq` from `identity`, received after its first `after` samples."""
    got = obs.received.get(identity)
    if got is None:
        return False
    samples = got.audio()
    return len(samples) >= after + 48000 and abs(dominant_frequency(samples[-48000:]) - freq) < 8


async def _status(obs: Observer, agent: str, payload: str = "") -> dict:
    return json.loads(await obs.room.local_participant.perform_rpc(
        destination_identity=agent, method="status", payload=payload, response_timeout=5))


async def _status_once_ready(obs: Observer, agent: str, timeout: float = 10) -> dict:
    """The agent's status, once it has registered its RPC method (it joins the room a moment before)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await _status(obs, agent)
        except rtc.RpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def _talk_to_agent(obs: Observer, freq: float, agent_name: str | None = None) -> tuple[str, dict]:
    """Wait for an AGENT participant that plays our tone back and answers RPC; its identity and status."""
    assert await wait_until(lambda: bool(_agents(obs, agent_name)), 30), f"no agent joined: {obs.events}"
    agent = _agents(obs, agent_name)[0].identity
    assert await wait_until(lambda: _hears_echo(obs, agent, freq), 20), "the agent's audio never echoed ours"
    status = await _status(obs, agent, "ping")
    assert status["frames"] > 0 and status["from"] == obs.identity and status["caller"] == obs.identity
    return agent, status


async def test_token_and_automatic_dispatch(agent_server, fleet, room_name):
    named, anonymous = fleet["token"][0], fleet["unnamed"][0]
    user = Observer("caller")
    lk = api.LiveKitAPI(agent_server.http_url, agent_server.api_key, agent_server.api_secret)
    media = DemoMedia(frequency=440)
    try:
        await user.connect(agent_server.ws_url, _user_token(agent_server, room_name, "caller", [
            api.RoomAgentDispatch(agent_name="echo-token", metadata='{"greeting": "hi"}')]))
        await media.start(user.room)
        agent, status = await _talk_to_agent(user, 440)
        assert status["metadata"] == '{"greeting": "hi"}' and status["pid"] == named.proc.pid
        await asyncio.sleep(1)
        assert [p.identity for p in _agents(user)] == [agent]  # the token named its agent: the unnamed one stays out
        info = await lk.room.get_participant(api.RoomParticipantIdentity(room=room_name, identity=agent))
        assert info.kind == api.ParticipantInfo.Kind.AGENT and info.attributes["lk.agent_name"] == "echo-token"
        # RoomService PerformRpc reaches the agent too (the server is the caller).
        reply = await lk.room._client.request("RoomService", "PerformRpc", api.PerformRpcRequest(
            room=room_name, destination_identity=agent, method="status", payload="server"),
            lk.room._auth_header(api.VideoGrants(room_admin=True, room=room_name)), api.PerformRpcResponse)
        assert json.loads(reply.payload)["payload"] == "server"
        await media.stop()
        await user.close()

        # A room created without agents in its token gets the worker registered without a name.
        plain = Observer("plain")
        await plain.connect(agent_server.ws_url, _user_token(agent_server, f"{room_name}-auto", "plain"))
        media = DemoMedia(frequency=660)
        await media.start(plain.room)
        _, status = await _talk_to_agent(plain, 660)
        assert status["pid"] == anonymous.proc.pid
        await plain.close()
    finally:
        await media.stop()
        await lk.aclose()
        await user.close()


async def test_dispatch_api_and_job_moves_when_its_worker_is_killed(agent_server, fleet, room_name):
    first, second = fleet["api"]
    user = Observer("caller")
    lk = api.LiveKitAPI(agent_server.http_url, agent_server.api_key, agent_server.api_secret)
    media = DemoMedia(frequency=440)
    try:
        await user.connect(agent_server.ws_url, _user_token(agent_server, room_name, "caller"))
        await media.start(user.room)
        dispatch = await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="echo-api", room=room_name, metadata="by-api"))
        agent, status = await _talk_to_agent(user, 440, "echo-api")
        assert status["metadata"] == "by-api"
        listed = await lk.agent_dispatch.list_dispatch(room_name)
        jobs = [j for d in listed if d.id == dispatch.id for j in d.state.jobs]
        assert [j.state.participant_identity for j in jobs] == [agent]

        running, spare = (first, second) if status["pid"] == first.proc.pid else (second, first)
        running.kill()  # mid-job, as a crash

        async def taken_over() -> bool:
            for candidate in _agents(user, "echo-api"):
                try:
                    if (await _status(user, candidate.identity))["pid"] == spare.proc.pid:
                        return True
                except Exception as exc:
                    errors.append(repr(exc))
            return False

        errors: list[str] = []

        moved = False
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if await taken_over():
                moved = True
                break
            await asyncio.sleep(0.5)
        assert moved, f"the job never reached the second worker: {errors[-3:]}\n{spare.log()[-2000:]}"
        assert await wait_until(lambda: len(_agents(user, "echo-api")) == 1, 20)  # the dead worker's agent left
        new_agent = _agents(user, "echo-api")[0].identity
        assert new_agent == agent  # the same job, so the same participant identity
        since = _heard(user, new_agent)
        assert await wait_until(lambda: _hears_echo(user, new_agent, 440, after=since), 20)
        listed = await lk.agent_dispatch.list_dispatch(room_name)
        assert [j.id for d in listed if d.id == dispatch.id for j in d.state.jobs] == [jobs[0].id]

        await lk.agent_dispatch.delete_dispatch(dispatch.id, room_name)
        assert await wait_until(lambda: not _agents(user, "echo-api"), 20), "the agent did not leave after DeleteDispatch"
    finally:
        await media.stop()
        await lk.aclose()
        await user.close()


async def test_a_publisher_worker_gets_a_job_per_publishing_participant(agent_server, fleet, room_name):
    """A worker registered as WorkerType.PUBLISHER gets one job for each participant that publishes, naming that
    participant, and none for a participant that only watches or for the agents' own publications."""
    worker = fleet["publisher"][0]
    dispatch = [api.RoomAgentDispatch(agent_name="echo-pub")]
    watcher, alice, bob = Observer("watcher"), Observer("alice"), Observer("bob")
    tones = [DemoMedia(frequency=440), DemoMedia(frequency=660)]
    try:
        await watcher.connect(agent_server.ws_url, _user_token(agent_server, room_name, "watcher", dispatch))
        await asyncio.sleep(2)
        assert not _agents(watcher), "a job before anyone published"
        for count, (user, tone) in enumerate(zip((alice, bob), tones), start=1):
            await user.connect(agent_server.ws_url, _user_token(agent_server, room_name, user.identity, dispatch))
            await tone.start(user.room)
            assert await wait_until(lambda: len(_agents(watcher, "echo-pub")) == count, 40), watcher.events
            for agent in _agents(watcher, "echo-pub"):  # each job's agent is up before the next publisher comes
                await _status_once_ready(watcher, agent.identity, timeout=40)
        statuses = [await _status(watcher, a.identity) for a in _agents(watcher, "echo-pub")]
        assert sorted((s["job_type"], s["participant"]) for s in statuses) == [
            ("JT_PUBLISHER", "alice"), ("JT_PUBLISHER", "bob")]
        assert {s["pid"] for s in statuses} == {worker.proc.pid}
        await asyncio.sleep(2)  # the agents published their echo: no job for those
        assert len(_agents(watcher, "echo-pub")) == 2
    finally:
        for tone in tones:
            await tone.stop()
        for user in (watcher, alice, bob):
            await user.close()
