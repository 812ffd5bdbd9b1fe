"""The agent worker protocol on `/agent` and AgentDispatchService, driven by hand-written workers speaking
livekit_agent.proto, against `braid-server --dev` (the real livekit-agents framework: test_agents_framework.py)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
import pytest
from livekit import api
from livekit.protocol import agent as agent_pb

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

pytestmark = pytest.mark.timeout(90)


class FakeWorker:
    """A worker that registers, answers availability as told and records what the server sends."""

    def __init__(self, server, agent_name: str = "", accept: bool = True, load: float = 0.0,
                 job_type: int = agent_pb.JT_ROOM):
        self.server = server
        self.agent_name = agent_name
        self.job_type = job_type
        self.accept = accept
        self.load = load
        self.messages: list[agent_pb.ServerMessage] = []
        self.worker_id = ""
        self.server_info = None
        self._session: aiohttp.ClientSession | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None

    def of(self, kind: str) -> list:
        return [getattr(m, kind) for m in self.messages if m.WhichOneof("message") == kind]

    async def connect(self) -> None:
        token = api.AccessToken(self.server.api_key, self.server.api_secret).with_grants(
            api.VideoGrants(agent=True)).to_jwt()
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(f"{self.server.ws_url}/agent",
                                                  headers={"Authorization": f"Bearer {token}"})
        await self.send(agent_pb.WorkerMessage(register=agent_pb.RegisterWorkerRequest(
            type=self.job_type, agent_name=self.agent_name, version="test")))
        first = agent_pb.ServerMessage.FromString(await self._ws.receive_bytes(timeout=5))
        assert first.WhichOneof("message") == "register"
        self.worker_id, self.server_info = first.register.worker_id, first.register.server_info
        await self.send(agent_pb.WorkerMessage(update_worker=agent_pb.UpdateWorkerStatus(
            status=agent_pb.WS_AVAILABLE if self.load < 1 else agent_pb.WS_FULL, load=self.load)))
        self._reader = asyncio.create_task(self._read())

    async def send(self, message: agent_pb.WorkerMessage) -> None:
        await self._ws.send_bytes(message.SerializeToString())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            message = agent_pb.ServerMessage.FromString(msg.data)
            self.messages.append(message)
            if message.WhichOneof("message") == "availability":
                job = message.availability.job
                await self.send(agent_pb.WorkerMessage(availability=agent_pb.AvailabilityResponse(
                    job_id=job.id, available=self.accept, participant_identity=f"agent-{job.id}",
                    participant_name="Test Agent", participant_attributes={"x": "1"})))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()


async def _until_assigned(*workers: FakeWorker, timeout: float = 10) -> FakeWorker:
    assert await wait_until(lambda: any(w.of("assignment") for w in workers), timeout)
    return next(w for w in workers if w.of("assignment"))


async def test_register_ping_and_refusals(dev_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{dev_server.http_url}/agent") as plain:
            assert plain.status == 404  # not a WebSocket upgrade
        token = join_token(dev_server.api_key, dev_server.api_secret, "r", "someone")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{dev_server.ws_url}/agent", headers={"Authorization": f"Bearer {token}"})
        assert refused.value.status == 401  # a join token is no agent token
    worker = FakeWorker(dev_server)
    await worker.connect()
    try:
        assert worker.worker_id.startswith("AW_")
        assert worker.server_info.version == "1.9.0" and worker.server_info.agent_protocol == 1
        await worker.send(agent_pb.WorkerMessage(ping=agent_pb.WorkerPing(timestamp=1234)))
        assert await wait_until(lambda: worker.of("pong"), 5)
        assert worker.of("pong")[0].last_timestamp == 1234
    finally:
        await worker.close()


async def test_dispatch_api_assignment_status_and_termination(dev_server, room_name):
    busy = FakeWorker(dev_server, "helper", load=1.0)  # full: never offered a job
    declining = FakeWorker(dev_server, "helper", accept=False)
    willing = FakeWorker(dev_server, "helper")
    other = FakeWorker(dev_server, "someone-else")
    workers = (busy, declining, willing, other)
    lk = api.LiveKitAPI(dev_server.http_url, dev_server.api_key, dev_server.api_secret)
    try:
        for w in workers:
            await w.connect()
        await asyncio.sleep(0.2)
        dispatch = await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="helper", room=room_name, metadata='{"task": 1}'))
        assert dispatch.id.startswith("AD_") and dispatch.agent_name == "helper"
        assert await _until_assigned(*workers) is willing
        assignment = willing.of("assignment")[0]
        assert assignment.job.metadata == '{"task": 1}' and assignment.job.room.name == room_name
        claims = jwt.decode(assignment.token, dev_server.api_secret, algorithms=["HS256"])
        assert claims["kind"] == "agent" and claims["video"]["room"] == room_name and claims["video"]["agent"]
        assert claims["attributes"] == {"x": "1", "lk.agent_name": "helper"}
        assert not busy.of("availability") and not other.of("availability")
        job_id = assignment.job.id

        await willing.send(agent_pb.WorkerMessage(update_job=agent_pb.UpdateJobStatus(
            job_id=job_id, status=agent_pb.JS_RUNNING)))
        listed = await lk.agent_dispatch.list_dispatch(room_name)
        helper = [d for d in listed if d.agent_name == "helper"]
        assert len(helper) == 1 and [j.id for j in helper[0].state.jobs] == [job_id]
        assert helper[0].state.jobs[0].state.worker_id == willing.worker_id
        assert helper[0].state.jobs[0].state.participant_identity == f"agent-{job_id}"

        # An agent joining with the assignment's token is an AGENT participant.
        agent = Observer("agent")
        await agent.connect(dev_server.ws_url, assignment.token)
        people = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
        assert [(p.identity, p.kind) for p in people.participants] == [(f"agent-{job_id}", 4)]
        await agent.close()

        deleted = await lk.agent_dispatch.delete_dispatch(dispatch.id, room_name)
        assert deleted.id == dispatch.id
        assert await wait_until(lambda: willing.of("termination"), 5)
        assert willing.of("termination")[0].job_id == job_id
        assert not [d for d in await lk.agent_dispatch.list_dispatch(room_name) if d.agent_name == "helper"]
        with pytest.raises(api.TwirpError) as missing:
            await lk.agent_dispatch.delete_dispatch(dispatch.id, room_name)
        assert missing.value.code == "not_found"
    finally:
        await lk.aclose()
        for w in workers:
            await w.close()


async def test_token_dispatch_automatic_dispatch_and_redispatch(dev_server, room_name):
    anonymous = FakeWorker(dev_server)  # no agent name: every new room gets it
    first = FakeWorker(dev_server, "voice")
    lk = api.LiveKitAPI(dev_server.http_url, dev_server.api_key, dev_server.api_secret)
    user = Observer("user")
    try:
        await anonymous.connect()
        await first.connect()
        token = (api.AccessToken(dev_server.api_key, dev_server.api_secret).with_identity("user")
                 .with_grants(api.VideoGrants(room_join=True, room=room_name))
                 .with_room_config(api.RoomConfiguration(agents=[api.RoomAgentDispatch(
                     agent_name="voice", metadata="from-token")])).to_jwt())
        await user.connect(dev_server.ws_url, token)
        assert await wait_until(lambda: first.of("assignment"), 10)
        job = first.of("assignment")[0].job
        assert job.metadata == "from-token" and job.room.name == room_name
        # The token names its agents, so workers without a name are not dispatched to this room...
        await asyncio.sleep(0.5)
        assert not anonymous.of("availability")
        # ...but a room created without any are.
        other_room = f"{room_name}-auto"
        await lk.room.create_room(api.CreateRoomRequest(name=other_room))
        assert await wait_until(lambda: anonymous.of("assignment"), 10)
        assert anonymous.of("assignment")[0].job.room.name == other_room

        # The worker running the job goes away: the job moves, as the same job, to another worker.
        second = FakeWorker(dev_server, "voice")
        await second.connect()
        started = time.monotonic()
        await first.close()
        assert await wait_until(lambda: second.of("assignment"), 15)
        moved = second.of("availability")[0]
        assert moved.job.id == job.id and moved.resuming
        assert time.monotonic() - started < 8
        listed = await lk.agent_dispatch.list_dispatch(room_name)
        assert [j.state.worker_id for d in listed for j in d.state.jobs] == [second.worker_id]
        await second.close()
    finally:
        await lk.aclose()
        await user.close()
        await anonymous.close()
        await first.close()


async def test_participant_and_publisher_jobs(dev_server, room_name):
    """Workers registered for JT_PARTICIPANT get a job per participant that joins, for JT_PUBLISHER one per
    participant that first publishes (LiveKit's job types); a dispatch created later covers those present."""
    per_participant = FakeWorker(dev_server, "helper", job_type=agent_pb.JT_PARTICIPANT)
    per_publisher = FakeWorker(dev_server, "helper", job_type=agent_pb.JT_PUBLISHER)
    late = FakeWorker(dev_server, "late", job_type=agent_pb.JT_PUBLISHER)
    lk = api.LiveKitAPI(dev_server.http_url, dev_server.api_key, dev_server.api_secret)
    alice, bob = Observer("alice"), Observer("bob")
    media = DemoMedia(frequency=440)

    def jobs(worker: FakeWorker) -> list[tuple[int, str]]:
        return sorted((a.job.type, a.job.participant.identity) for a in worker.of("assignment"))

    def token(identity: str) -> str:
        return (api.AccessToken(dev_server.api_key, dev_server.api_secret).with_identity(identity)
                .with_grants(api.VideoGrants(room_join=True, room=room_name))
                .with_room_config(api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name="helper")]))
                .to_jwt())
    try:
        for worker in (per_participant, per_publisher, late):
            await worker.connect()
        await alice.connect(dev_server.ws_url, token("alice"))
        await bob.connect(dev_server.ws_url, token("bob"))
        assert await wait_until(lambda: len(jobs(per_participant)) == 2, 10), per_participant.messages
        assert jobs(per_participant) == [(agent_pb.JT_PARTICIPANT, "alice"), (agent_pb.JT_PARTICIPANT, "bob")]
        await asyncio.sleep(1)
        assert not per_publisher.of("availability")  # nobody has published yet

        await media.start(alice.room)  # audio and video: one publisher job, on the first publication
        assert await wait_until(lambda: jobs(per_publisher), 10)
        await asyncio.sleep(1)
        assert jobs(per_publisher) == [(agent_pb.JT_PUBLISHER, "alice")]
        assert per_publisher.of("assignment")[0].job.room.name == room_name

        dispatch = await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(
            agent_name="late", room=room_name))
        assert await wait_until(lambda: jobs(late), 10)
        assert jobs(late) == [(agent_pb.JT_PUBLISHER, "alice")]
        listed = await lk.agent_dispatch.list_dispatch(room_name)
        assert [(j.type, j.participant.identity) for d in listed if d.id == dispatch.id for j in d.state.jobs] == [
            (agent_pb.JT_PUBLISHER, "alice")]
        assert len(jobs(per_participant)) == 2  # the room job of "late" went to no one: no room worker has its name
    finally:
        await media.stop()
        await lk.aclose()
        for closing in (alice, bob, per_participant, per_publisher, late):
            await closing.close()
