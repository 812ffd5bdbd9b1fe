"""What the agent services share: registered workers, dispatches and their jobs, and the bus messages between the
signal nodes that hold worker connections and the routers that assign jobs.

`AgentStore` is the one interface; `MemoryAgentStore` backs the dev mode, the Redis store a cluster.
"""

from __future__ import annotations

import abc
import base64
import json
import time
from dataclasses import asdict, dataclass, field

from livekit.protocol import agent as agent_pb
from livekit.protocol import agent_dispatch as dispatch_pb
from livekit.protocol import models

WORKER_TTL = 6.0  # a worker record not refreshed this long belongs to a gone signal node
ASSIGN_TIMEOUT = 10.0  # LiveKit's AssignJobTimeout: availability answer and assignment


def node_channel(node_id: str) -> str:
    """Where a signal node receives job offers and terminations for the workers it holds."""
    return f"agents:node:{node_id}"


def reply_channel(node_id: str) -> str:
    """Where a router receives the outcome of the offers it made."""
    return f"agents:reply:{node_id}"


# Where media nodes tell the routers that a participant joined or first published: the events LiveKit launches
# JT_PARTICIPANT and JT_PUBLISHER jobs on. Every router hears them; a claim in the store makes each job once.
TARGETS_CHANNEL = "agents:targets"
DEPENDENT_KINDS = (models.ParticipantInfo.Kind.AGENT, models.ParticipantInfo.Kind.EGRESS)  # get no jobs of their own


@dataclass
class WorkerRecord:
    """A registered worker as every node sees it; its signal node refreshes it while the connection lives."""

    worker_id: str
    node_id: str  # the signal node holding its connection
    agent_name: str = ""
    namespace: str = ""
    job_type: int = agent_pb.JT_ROOM
    deployment: str = ""
    version: str = ""
    status: int = agent_pb.WS_AVAILABLE
    load: float = 0.0
    jobs: int = 0
    updated_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "WorkerRecord":
        return cls(**json.loads(text))

    def serves(self, agent_name: str, job_type: int, namespace: str = "", deployment: str = "") -> bool:
        return (self.agent_name, self.job_type, self.namespace, self.deployment) == (
            agent_name, job_type, namespace, deployment)


class AgentStore(abc.ABC):
    """Workers, dispatches and jobs. All methods are safe to call from any node."""

    @abc.abstractmethod
    async def put_worker(self, worker: WorkerRecord) -> None: ...

    @abc.abstractmethod
    async def remove_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def workers(self) -> list[WorkerRecord]:
        """Workers refreshed within `WORKER_TTL`."""

    @abc.abstractmethod
    async def put_dispatch(self, dispatch: dispatch_pb.AgentDispatch) -> None:
        """Store a dispatch of `dispatch.room` (its state's job list is kept apart, see `put_job`)."""

    @abc.abstractmethod
    async def delete_dispatch(self, room: str, dispatch_id: str) -> bool: ...

    @abc.abstractmethod
    async def dispatches(self, room: str) -> list[dispatch_pb.AgentDispatch]: ...

    @abc.abstractmethod
    async def put_job(self, room: str, job: agent_pb.Job) -> None: ...

    @abc.abstractmethod
    async def delete_job(self, room: str, job_id: str) -> None: ...

    @abc.abstractmethod
    async def jobs(self, room: str) -> list[agent_pb.Job]: ...

    @abc.abstractmethod
    async def rooms_with_jobs(self) -> list[str]: ...

    @abc.abstractmethod
    async def claim_target(self, room: str, key: str) -> bool:
        """True for the first caller only, cluster-wide, until the room is forgotten: one job per dispatch and
        participant (or publisher) however many routers hear of it."""

    @abc.abstractmethod
    async def forget_room(self, room: str) -> None:
        """Remove every dispatch and job of a room that finished."""

    async def job(self, room: str, job_id: str) -> agent_pb.Job | None:
        return next((j for j in await self.jobs(room) if j.id == job_id), None)

    async def update_job(self, room: str, job_id: str, **state) -> agent_pb.Job | None:
        """Change fields of a stored job's state; None if the job is gone (its room finished)."""
        job = await self.job(room, job_id)
        if job is None:
            return None
        for name, value in state.items():
            setattr(job.state, name, value)
        job.state.updated_at = time.time_ns()
        await self.put_job(room, job)
        return job

    async def close(self) -> None:
        return None


def _clone(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


class MemoryAgentStore(AgentStore):
    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._dispatches: dict[str, dict[str, dispatch_pb.AgentDispatch]] = {}
        self._jobs: dict[str, dict[str, agent_pb.Job]] = {}
        self._targets: dict[str, set[str]] = {}

    async def put_worker(self, worker: WorkerRecord) -> None:
        worker.updated_at = time.time()
        self._workers[worker.worker_id] = WorkerRecord(**asdict(worker))

    async def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> list[WorkerRecord]:
        fresh = time.time() - WORKER_TTL
        return [WorkerRecord(**asdict(w)) for w in self._workers.values() if w.updated_at > fresh]

    async def put_dispatch(self, dispatch: dispatch_pb.AgentDispatch) -> None:
        stored = _clone(dispatch)
        del stored.state.jobs[:]
        self._dispatches.setdefault(dispatch.room, {})[dispatch.id] = stored

    async def delete_dispatch(self, room: str, dispatch_id: str) -> bool:
        return self._dispatches.get(room, {}).pop(dispatch_id, None) is not None

    async def dispatches(self, room: str) -> list[dispatch_pb.AgentDispatch]:
        found = [_clone(d) for d in self._dispatches.get(room, {}).values()]
        return sorted(found, key=lambda d: d.state.created_at)

    async def put_job(self, room: str, job: agent_pb.Job) -> None:
        self._jobs.setdefault(room, {})[job.id] = _clone(job)

    async def delete_job(self, room: str, job_id: str) -> None:
        self._jobs.get(room, {}).pop(job_id, None)

    async def jobs(self, room: str) -> list[agent_pb.Job]:
        return [_clone(j) for j in self._jobs.get(room, {}).values()]

    async def rooms_with_jobs(self) -> list[str]:
        return [room for room, jobs in self._jobs.items() if jobs]

    async def claim_target(self, room: str, key: str) -> bool:
        claimed = self._targets.setdefault(room, set())
        if key in claimed:
            return False
        claimed.add(key)
        return True

    async def forget_room(self, room: str) -> None:
        self._dispatches.pop(room, None)
        self._jobs.pop(room, None)
        self._targets.pop(room, None)


# --- bus envelopes -------------------------------------------------------------------------------------------


def encode(kind: str, **fields) -> bytes:
    """A bus message: JSON, protobuf fields base64-encoded."""
    body = {"kind": kind}
    for name, value in fields.items():
        if hasattr(value, "SerializeToString"):
            body[name] = base64.b64encode(value.SerializeToString()).decode()
        else:
            body[name] = value
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> dict:
    message = json.loads(data)
    if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
        raise ValueError("not an agent bus message")
    return message


def message_field(message: dict, name: str, message_type):
    value = message.get(name)
    return message_type.FromString(base64.b64decode(value)) if value else None
