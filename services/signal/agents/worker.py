"""One agent worker's connection (livekit_agent.proto over a WebSocket): its registration, the jobs offered to it
and the jobs it runs, as LiveKit's `pkg/agent` worker does."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from livekit.protocol import agent as agent_pb
from livekit.protocol import models

from braid.shared import ids
from braid.shared.agents import ASSIGN_TIMEOUT, AgentStore, WorkerRecord
from braid.shared.auth import mint_token

log = logging.getLogger(__name__)

AGENT_NAME_ATTRIBUTE = "lk.agent_name"
AGENT_TOKEN_TTL = 3600
ENDED = (agent_pb.JS_SUCCESS, agent_pb.JS_FAILED)
MAX_RUNNING_JOBS = 10_000  # a worker that claims more is refused further jobs


class NotAvailable(Exception):
    """The worker declined the job, went away, or did not answer in time."""


def default_permissions() -> models.ParticipantPermission:
    return models.ParticipantPermission(can_subscribe=True, can_publish=True, can_publish_data=True,
                                        can_update_metadata=True)


class WorkerConnection:
    def __init__(self, ws: web.WebSocketResponse, register: agent_pb.RegisterWorkerRequest, node_id: str,
                 api_key: str, api_secret: str, store: AgentStore):
        self.ws = ws
        self.api_key = api_key
        self.api_secret = api_secret
        self.store = store
        self.permissions = (register.allowed_permissions if register.HasField("allowed_permissions")
                            else default_permissions())
        self.record = WorkerRecord(
            worker_id=ids.agent_worker_id(), node_id=node_id, agent_name=register.agent_name,
            namespace=register.namespace, job_type=register.type, deployment=register.deployment,
            version=register.version,
        )
        self.running: dict[str, str] = {}  # job id → room
        self._offers: dict[str, asyncio.Future] = {}
        self._send_lock = asyncio.Lock()

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    def __repr__(self) -> str:
        return f"worker {self.worker_id} ({self.record.agent_name or 'no agent name'})"

    async def send(self, message: agent_pb.ServerMessage) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(message.SerializeToString())

    # --- messages from the worker -------------------------------------------------------------------------

    async def handle(self, message: agent_pb.WorkerMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "availability":
            future = self._offers.get(message.availability.job_id)
            if future is not None and not future.done():
                future.set_result(message.availability)
        elif kind == "update_job":
            await self._on_update_job(message.update_job)
        elif kind == "update_worker":
            update = message.update_worker
            if update.HasField("status"):
                self.record.status = update.status
            self.record.load = update.load
            self.record.jobs = update.job_count
            await self.store.put_worker(self.record)
        elif kind == "ping":
            await self.send(agent_pb.ServerMessage(pong=agent_pb.WorkerPong(
                last_timestamp=message.ping.timestamp, timestamp=int(time.time() * 1000))))
        elif kind == "migrate_job":
            await self._on_migrate(list(message.migrate_job.job_ids))
        elif kind == "simulate_job":
            log.info("%s: simulated jobs are not dispatched by this server", self)
        elif kind == "register":
            log.info("%s registered twice; ignoring the second registration", self)

    async def _on_update_job(self, update: agent_pb.UpdateJobStatus) -> None:
        room = self.running.get(update.job_id)
        if room is None:
            log.debug("%s: update for unknown job %s", self, update.job_id)
            return
        fields = {"status": update.status, "error": update.error}
        if update.status in ENDED:
            fields["ended_at"] = time.time_ns()
            del self.running[update.job_id]
            log.info("%s: job %s in %s ended: %s %s", self, update.job_id, room,
                     agent_pb.JobStatus.Name(update.status), update.error)
        await self.store.update_job(room, update.job_id, **fields)

    async def _on_migrate(self, job_ids: list[str]) -> None:
        """A reconnected worker names the jobs it still runs: they are its own again, not orphans to re-dispatch."""
        for room in await self.store.rooms_with_jobs():
            for job in await self.store.jobs(room):
                if job.id in job_ids and job.state.status not in ENDED:
                    self.running[job.id] = room
                    await self.store.update_job(room, job.id, worker_id=self.worker_id)
                    log.info("%s took back job %s in %s", self, job.id, room)

    # --- jobs offered by a router -------------------------------------------------------------------------

    async def assign(self, job: agent_pb.Job, resuming: bool) -> agent_pb.JobState:
        """Ask the worker whether it takes `job`; when it does, assign it with a token for its participant."""
        if job.id in self._offers:
            raise NotAvailable("duplicate job assignment")
        if len(self.running) >= MAX_RUNNING_JOBS:
            raise NotAvailable("worker runs too many jobs")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._offers[job.id] = future
        now = time.time_ns()
        job.state.CopyFrom(agent_pb.JobState(worker_id=self.worker_id, status=agent_pb.JS_RUNNING,
                                             started_at=now, updated_at=now))
        try:
            await self.send(agent_pb.ServerMessage(availability=agent_pb.AvailabilityRequest(
                job=job, resuming=resuming)))
            answer: agent_pb.AvailabilityResponse = await asyncio.wait_for(future, ASSIGN_TIMEOUT)
        except asyncio.TimeoutError:
            raise NotAvailable("agent worker availability timeout") from None
        except (ConnectionResetError, RuntimeError) as exc:
            raise NotAvailable(f"worker closed: {exc}") from None
        finally:
            self._offers.pop(job.id, None)
        if answer.terminate:
            job.state.status = agent_pb.JS_SUCCESS
            job.state.ended_at = now
            await self.store.put_job(job.room.name, job)
            return job.state
        if not answer.available:
            raise NotAvailable("worker not available")
        identity = answer.participant_identity or f"agent-{job.id}"
        job.state.participant_identity = identity
        attributes = dict(answer.participant_attributes)
        attributes[AGENT_NAME_ATTRIBUTE] = self.record.agent_name
        token = self._agent_token(job.room.name, identity, answer.participant_name,
                                  answer.participant_metadata, attributes)
        await self.store.put_job(job.room.name, job)  # before the worker can report on it
        self.running[job.id] = job.room.name
        try:
            await self.send(agent_pb.ServerMessage(assignment=agent_pb.JobAssignment(job=job, token=token)))
        except (ConnectionResetError, RuntimeError) as exc:
            self.running.pop(job.id, None)
            raise NotAvailable(f"worker closed: {exc}") from None
        log.info("%s assigned job %s in %s as %s", self, job.id, job.room.name, identity)
        return job.state

    def _agent_token(self, room: str, identity: str, name: str, metadata: str, attributes: dict) -> str:
        p = self.permissions
        video = {
            "roomJoin": True, "agent": True, "room": room, "canSubscribe": p.can_subscribe,
            "canPublish": p.can_publish, "canPublishData": p.can_publish_data, "hidden": p.hidden,
            "canUpdateOwnMetadata": p.can_update_metadata, "canSubscribeMetrics": p.can_subscribe_metrics,
        }
        return mint_token(self.api_key, self.api_secret, identity=identity, name=name, metadata=metadata,
                          attributes=attributes, kind="agent", video=video, ttl_seconds=AGENT_TOKEN_TTL)

    async def terminate(self, job_id: str) -> None:
        if job_id not in self.running:
            return
        try:
            await self.send(agent_pb.ServerMessage(termination=agent_pb.JobTermination(job_id=job_id)))
        except (ConnectionResetError, RuntimeError):
            pass

    def close(self) -> None:
        for future in self._offers.values():
            if not future.done():
                future.set_exception(NotAvailable("worker closed"))
