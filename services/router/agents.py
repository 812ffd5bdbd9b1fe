"""Agent dispatch, made once cluster-wide: which dispatches a room has, and which worker runs each of their jobs.

A room's dispatches come from the token that created it (`RoomConfiguration.agents`, or one dispatch to workers
registered without an agent name when it names none, as LiveKit does) or from AgentDispatchService. Each gives the
room a JT_ROOM job, every participant a JT_PARTICIPANT job and every publisher a JT_PUBLISHER job, for the
workers registered with that job type (media nodes announce joins and first publications on TARGETS_CHANNEL; a
claim in the store makes each target's job once however many routers hear it). Each job is offered to the
registered workers that serve it, chosen at random weighted by their spare load, through the
bus to the signal node holding the worker. The router that created the room or the dispatch makes the offer; a
job whose worker is gone (its connection closed or its signal node died) is offered again, with `resuming`, by the
router holding the `agent-jobs` lease, so it happens once even with several routers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from livekit.protocol import agent as agent_pb
from livekit.protocol import agent_dispatch as dispatch_pb
from livekit.protocol import models
from livekit.protocol import room as room_pb

from braid.shared import ids
from braid.shared.agents import (ASSIGN_TIMEOUT, DEPENDENT_KINDS, TARGETS_CHANNEL, AgentStore, WorkerRecord, decode,
                                 encode, message_field, node_channel, reply_channel)
from braid.shared.bus import Bus
from braid.shared.tasks import OwnedTasks
from braid.shared.store import RoomStore

log = logging.getLogger(__name__)

LEASE = "agent-jobs"
LEASE_TTL = 5.0
SWEEP_INTERVAL = 1.0
ORPHAN_GRACE = 1.5  # a worker that reconnects at once takes its jobs back (MigrateJobRequest) in this time
OFFER_TIMEOUT = ASSIGN_TIMEOUT + 2.0
ENDED = (agent_pb.JS_SUCCESS, agent_pb.JS_FAILED)
MAX_DISPATCHES_PER_ROOM = 100
TARGET_TYPES = (agent_pb.JT_PARTICIPANT, agent_pb.JT_PUBLISHER)


class DispatchError(Exception):
    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


def choose_worker(workers: list[WorkerRecord], rng: random.Random = random) -> WorkerRecord | None:
    """A worker with spare capacity, picked with probability proportional to it (LiveKit's weighted choice)."""
    spare = [(w, max(0.0, 1.0 - w.load)) for w in workers if w.status == agent_pb.WS_AVAILABLE]
    total = sum(weight for _, weight in spare)
    if total <= 0:
        return None
    point = rng.random() * total
    for worker, weight in spare:
        point -= weight
        if point <= 0:
            return worker
    return spare[-1][0]


class AgentDispatcher:
    def __init__(self, agents: AgentStore, rooms: RoomStore, bus: Bus, node_id: str):
        self.agents = agents
        self.rooms = rooms
        self.bus = bus
        self.node_id = node_id
        self._offers: dict[str, asyncio.Future] = {}
        self._orphaned_since: dict[str, float] = {}
        self._resuming: set[str] = set()  # jobs this router is offering again
        self._tasks = OwnedTasks()
        self._subscription = None
        self._targets = None

    async def start(self) -> None:
        self._subscription = await self.bus.subscribe(reply_channel(self.node_id))
        self._targets = await self.bus.subscribe(TARGETS_CHANNEL)
        self._tasks.spawn(self._read_replies(), "agent-replies")
        self._tasks.spawn(self._read_targets(), "agent-targets")
        self._tasks.spawn(self._sweep_loop(), "agent-sweep")

    async def stop(self) -> None:
        if self._targets is not None:
            await self._targets.close()
        if self._subscription is not None:
            await self._subscription.close()
        await self._tasks.cancel_all()

    # --- dispatches ---------------------------------------------------------------------------------------

    async def room_started(self, room: models.Room, config: room_pb.RoomConfiguration | None) -> None:
        wanted = list(config.agents) if config is not None else []
        for entry in wanted or [dispatch_pb.RoomAgentDispatch()]:
            await self._add(room, dispatch_pb.AgentDispatch(
                id=ids.agent_dispatch_id(), agent_name=entry.agent_name, room=room.name, metadata=entry.metadata,
                restart_policy=entry.restart_policy, deployment=entry.deployment, attributes=entry.attributes))

    async def create(self, room: models.Room, req: dispatch_pb.CreateAgentDispatchRequest) -> dispatch_pb.AgentDispatch:
        if len(await self.agents.dispatches(room.name)) >= MAX_DISPATCHES_PER_ROOM:
            raise DispatchError("resource_exhausted", f"room {room.name!r} has {MAX_DISPATCHES_PER_ROOM} dispatches")
        return await self._add(room, dispatch_pb.AgentDispatch(
            id=ids.agent_dispatch_id(), agent_name=req.agent_name, room=room.name, metadata=req.metadata,
            restart_policy=req.restart_policy, deployment=req.deployment, attributes=req.attributes))

    async def _add(self, room: models.Room, dispatch: dispatch_pb.AgentDispatch) -> dispatch_pb.AgentDispatch:
        dispatch.state.created_at = time.time_ns()
        await self.agents.put_dispatch(dispatch)
        log.info("dispatch %s of agent %r in %s", dispatch.id, dispatch.agent_name, room.name)
        self._tasks.spawn(self._launch(room, dispatch), f"agent-launch-{dispatch.id}")
        self._tasks.spawn(self._launch_for_present(room, dispatch), f"agent-targets-{dispatch.id}")
        return dispatch

    # --- participant and publisher jobs ---------------------------------------------------------------------

    async def _read_targets(self) -> None:
        async for data in self._targets:
            try:
                event = decode(data)
                info = message_field(event, "participant", models.ParticipantInfo)
                room_name, job_type = str(event["room"]), int(event["job_type"])
            except (ValueError, KeyError, TypeError):
                continue
            if info is not None and job_type in TARGET_TYPES:
                self._tasks.spawn(self.target(room_name, info, job_type), f"agent-target-{info.sid}")

    async def target(self, room_name: str, info: models.ParticipantInfo, job_type: int) -> None:
        """A participant joined (JT_PARTICIPANT) or published (JT_PUBLISHER): each dispatch's job for it."""
        try:
            room = await self.rooms.get_room(room_name)
            if room is not None:
                await self._launch_targets(room, await self.agents.dispatches(room_name), [(info, job_type)])
        except Exception:
            log.exception("launching agent jobs for %s in %s failed", info.identity, room_name)

    async def _launch_for_present(self, room: models.Room, dispatch: dispatch_pb.AgentDispatch) -> None:
        """A new dispatch in a room with participants: their participant and publisher jobs, as LiveKit does."""
        try:
            present = await self.rooms.list_participants(room.name)
            wanted = [(info, agent_pb.JT_PARTICIPANT) for info in present]
            wanted += [(info, agent_pb.JT_PUBLISHER) for info in present if info.tracks]
            await self._launch_targets(room, [dispatch], wanted)
        except Exception:
            log.exception("launching the jobs of dispatch %s for those in %s failed", dispatch.id, room.name)

    async def _launch_targets(self, room: models.Room, dispatches: list[dispatch_pb.AgentDispatch],
                              wanted: list[tuple[models.ParticipantInfo, int]]) -> None:
        """Each dispatch's job for each (participant, job type), where a worker of that type serves it (LiveKit
        launches none otherwise) and no router has claimed it yet."""
        workers = await self.agents.workers()
        for info, job_type in wanted:
            if info.kind in DEPENDENT_KINDS:
                continue
            who = info.identity if job_type == agent_pb.JT_PUBLISHER else info.sid  # LiveKit: first publication
            for dispatch in dispatches:
                if not any(w.serves(dispatch.agent_name, job_type, "", dispatch.deployment) for w in workers):
                    continue
                if await self.agents.claim_target(room.name, f"{dispatch.id}:{job_type}:{who}"):
                    self._tasks.spawn(self._launch(room, dispatch, job_type, info), f"agent-launch-{dispatch.id}")

    async def list(self, room: str, dispatch_id: str = "") -> list[dispatch_pb.AgentDispatch]:
        jobs = await self.agents.jobs(room)
        found = []
        for dispatch in await self.agents.dispatches(room):
            if dispatch_id and dispatch.id != dispatch_id:
                continue
            dispatch.state.jobs.extend(sorted((j for j in jobs if j.dispatch_id == dispatch.id),
                                              key=lambda j: j.state.started_at))
            found.append(dispatch)
        return found

    async def delete(self, room: str, dispatch_id: str) -> dispatch_pb.AgentDispatch:
        found = await self.list(room, dispatch_id)
        if not found:
            raise DispatchError("not_found", f"dispatch {dispatch_id!r} is not in room {room!r}")
        dispatch = found[0]
        await self.agents.delete_dispatch(room, dispatch_id)
        workers = {w.worker_id: w for w in await self.agents.workers()}
        for job in dispatch.state.jobs:
            await self._terminate(job, workers)
            await self.agents.update_job(room, job.id, status=agent_pb.JS_SUCCESS, ended_at=time.time_ns())
        dispatch.state.deleted_at = time.time_ns()
        return dispatch

    async def room_finished(self, room: str) -> None:
        workers = {w.worker_id: w for w in await self.agents.workers()}
        for job in await self.agents.jobs(room):
            await self._terminate(job, workers)
        await self.agents.forget_room(room)

    async def _terminate(self, job: agent_pb.Job, workers: dict[str, WorkerRecord]) -> None:
        worker = workers.get(job.state.worker_id)
        if worker is not None and job.state.status not in ENDED:
            await self.bus.publish(node_channel(worker.node_id),
                                   encode("terminate", worker_id=worker.worker_id, job_id=job.id))

    # --- offering a job -----------------------------------------------------------------------------------

    async def _launch(self, room: models.Room, dispatch: dispatch_pb.AgentDispatch, job_type: int = agent_pb.JT_ROOM,
                      participant: models.ParticipantInfo | None = None) -> None:
        job = agent_pb.Job(
            id=ids.agent_job_id(), dispatch_id=dispatch.id, type=job_type, room=room, participant=participant,
            agent_name=dispatch.agent_name, metadata=dispatch.metadata, deployment=dispatch.deployment,
            attributes=dispatch.attributes)
        try:
            await self._offer_until_taken(job, resuming=False)
        except Exception:
            log.exception("launching dispatch %s in %s failed", dispatch.id, room.name)

    async def _offer_until_taken(self, job: agent_pb.Job, resuming: bool) -> agent_pb.JobState | None:
        tried: set[str] = set()
        while True:
            candidates = [w for w in await self.agents.workers()
                          if w.worker_id not in tried and w.serves(job.agent_name, job.type, job.namespace,
                                                                   job.deployment)]
            worker = choose_worker(candidates)
            if worker is None:
                log.info("no agent worker available for %r in %s (job %s)", job.agent_name, job.room.name, job.id)
                return None
            tried.add(worker.worker_id)
            state = await self._offer(worker, job, resuming)
            if state is not None:
                return state

    async def _offer(self, worker: WorkerRecord, job: agent_pb.Job, resuming: bool) -> agent_pb.JobState | None:
        request_id = ids.guid("AO_")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._offers[request_id] = future
        try:
            await self.bus.publish(node_channel(worker.node_id), encode(
                "offer", id=request_id, reply_to=reply_channel(self.node_id), worker_id=worker.worker_id,
                job=job, resuming=resuming))
            reply = await asyncio.wait_for(future, OFFER_TIMEOUT)
        except asyncio.TimeoutError:
            log.info("worker %s did not answer for job %s", worker.worker_id, job.id)
            return None
        finally:
            self._offers.pop(request_id, None)
        if reply["kind"] != "assigned":
            log.info("worker %s refused job %s: %s", worker.worker_id, job.id, reply.get("reason", ""))
            return None
        return message_field(reply, "state", agent_pb.JobState)

    async def _read_replies(self) -> None:
        async for data in self._subscription:
            try:
                reply = decode(data)
            except ValueError:
                continue
            future = self._offers.get(reply.get("id", ""))
            if future is not None and not future.done():
                future.set_result(reply)

    # --- jobs whose worker went away ----------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("agent job sweep failed (%r); retrying", exc)
                failing = True

    async def sweep(self) -> None:
        if not await self.rooms.try_lease(LEASE, self.node_id, LEASE_TTL):
            self._orphaned_since.clear()
            return
        live = {w.worker_id for w in await self.agents.workers()}
        now = time.monotonic()
        orphans = set()
        for room_name in await self.agents.rooms_with_jobs():
            for job in await self.agents.jobs(room_name):
                if job.state.status in ENDED or job.state.worker_id in live or job.id in self._resuming:
                    continue
                orphans.add(job.id)
                since = self._orphaned_since.setdefault(job.id, now)
                if now - since >= ORPHAN_GRACE:
                    self._orphaned_since.pop(job.id, None)
                    await self._relaunch(room_name, job)
        for job_id in set(self._orphaned_since) - orphans:
            del self._orphaned_since[job_id]

    async def _relaunch(self, room_name: str, job: agent_pb.Job) -> None:
        room = await self.rooms.get_room(room_name)
        dispatches = {d.id for d in await self.agents.dispatches(room_name)}
        gone = job.type != agent_pb.JT_ROOM and await self.rooms.get_participant(
            room_name, job.participant.identity) is None  # a participant's job ends with the participant
        if room is None or job.dispatch_id not in dispatches or gone:
            await self.agents.delete_job(room_name, job.id)
            return
        log.info("job %s in %s lost its worker %s; offering it again", job.id, room_name, job.state.worker_id)
        await self.agents.update_job(room_name, job.id, status=agent_pb.JS_PENDING)
        job.room.CopyFrom(room)
        self._resuming.add(job.id)
        self._tasks.spawn(self._resume(room_name, job), f"agent-resume-{job.id}")

    async def _resume(self, room_name: str, job: agent_pb.Job) -> None:
        try:
            state = await self._offer_until_taken(job, resuming=True)
        finally:
            self._resuming.discard(job.id)
        if state is None:
            await self.agents.update_job(room_name, job.id, status=agent_pb.JS_FAILED,
                                         error="no agent worker available to take the job over",
                                         ended_at=time.time_ns())
