"""The Redis `AgentStore`: worker records in one hash (stale ones skipped on read), and per room one hash each of
dispatches, jobs and claimed participant targets under the room's hash tag."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from livekit.protocol import agent as agent_pb
from livekit.protocol import agent_dispatch as dispatch_pb

from braid.shared.agents import WORKER_TTL, AgentStore, WorkerRecord


class RedisAgentStore(AgentStore):
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.r = client
        self.prefix = prefix

    @property
    def _workers(self) -> str:
        return f"{self.prefix}:agent-workers"

    @property
    def _job_rooms(self) -> str:
        return f"{self.prefix}:agent-job-rooms"

    def _room(self, room: str, part: str) -> str:
        return f"{self.prefix}:{{room:{room}}}:{part}"

    async def put_worker(self, worker: WorkerRecord) -> None:
        worker.updated_at = time.time()
        await self.r.hset(self._workers, worker.worker_id, worker.to_json())

    async def remove_worker(self, worker_id: str) -> None:
        await self.r.hdel(self._workers, worker_id)

    async def workers(self) -> list[WorkerRecord]:
        fresh = time.time() - WORKER_TTL
        found, stale = [], []
        for worker_id, raw in (await self.r.hgetall(self._workers)).items():
            record = WorkerRecord.from_json(raw)
            (found if record.updated_at > fresh else stale).append(record)
        if stale and any(w.updated_at < fresh - 10 * WORKER_TTL for w in stale):
            await self.r.hdel(self._workers, *[w.worker_id for w in stale])  # long gone: tidy up
        return found

    async def put_dispatch(self, dispatch: dispatch_pb.AgentDispatch) -> None:
        stored = dispatch_pb.AgentDispatch()
        stored.CopyFrom(dispatch)
        del stored.state.jobs[:]
        await self.r.hset(self._room(dispatch.room, "dispatches"), dispatch.id, stored.SerializeToString())

    async def delete_dispatch(self, room: str, dispatch_id: str) -> bool:
        return bool(await self.r.hdel(self._room(room, "dispatches"), dispatch_id))

    async def dispatches(self, room: str) -> list[dispatch_pb.AgentDispatch]:
        raw = await self.r.hgetall(self._room(room, "dispatches"))
        found = [dispatch_pb.AgentDispatch.FromString(v) for v in raw.values()]
        return sorted(found, key=lambda d: d.state.created_at)

    async def put_job(self, room: str, job: agent_pb.Job) -> None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hset(self._room(room, "jobs"), job.id, job.SerializeToString())
            pipe.sadd(self._job_rooms, room)
            await pipe.execute()

    async def delete_job(self, room: str, job_id: str) -> None:
        await self.r.hdel(self._room(room, "jobs"), job_id)

    async def jobs(self, room: str) -> list[agent_pb.Job]:
        raw = await self.r.hgetall(self._room(room, "jobs"))
        return [agent_pb.Job.FromString(v) for v in raw.values()]

    async def rooms_with_jobs(self) -> list[str]:
        return sorted(r.decode() for r in await self.r.smembers(self._job_rooms))

    async def claim_target(self, room: str, key: str) -> bool:
        return bool(await self.r.hsetnx(self._room(room, "agent-targets"), key, 1))

    async def forget_room(self, room: str) -> None:
        await self.r.delete(*(self._room(room, part) for part in ("dispatches", "jobs", "agent-targets")))
        await self.r.srem(self._job_rooms, room)
