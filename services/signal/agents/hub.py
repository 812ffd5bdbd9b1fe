"""`/agent`: where livekit-agents workers register (LiveKit's `AgentService`), and the workers this signal node
holds. Their records go to the shared `AgentStore` (refreshed while connected); routers offer them jobs over the
bus (`agents:node:<id>`), so a worker connected here serves rooms on any media node.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web
from google.protobuf.message import DecodeError
from livekit.protocol import agent as agent_pb

from braid.shared.agents import AgentStore, decode, encode, message_field, node_channel
from braid.shared.auth import AuthError, KeyProvider, bearer_token, verify_token
from braid.shared.bus import Bus
from braid.shared.tasks import OwnedTasks
from braid.shared.serverinfo import server_info

from .worker import NotAvailable, WorkerConnection

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = 10.0  # LiveKit's RegisterTimeout
REFRESH_INTERVAL = 2.0
MAX_MESSAGE = 1024 * 1024
MAX_WORKERS = 1000  # per signal node


class AgentHub:
    def __init__(self, store: AgentStore, bus: Bus, keys: KeyProvider, node_id: str, region: str):
        self.store = store
        self.bus = bus
        self.keys = keys
        self.node_id = node_id
        self.region = region
        self.workers: dict[str, WorkerConnection] = {}
        self._tasks = OwnedTasks()
        self._subscription = None

    async def start(self) -> None:
        self._subscription = await self.bus.subscribe(node_channel(self.node_id))
        self._tasks.spawn(self._read_offers(), "agent-offers")
        self._tasks.spawn(self._refresh_loop(), "agent-worker-refresh")

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.close()
        await self._tasks.cancel_all()
        for worker in list(self.workers.values()):
            await self.store.remove_worker(worker.worker_id)
            await worker.ws.close()

    # --- the WebSocket ------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(status=404, text="404: Not Found")
        token = bearer_token(request.headers.get("Authorization"), request.query.get("access_token"))
        try:
            claims = verify_token(token, self.keys)
        except AuthError as exc:
            return web.Response(status=exc.status, text=str(exc))
        if not claims.video.agent:
            return web.Response(status=401, text="permission denied: token has no agent grant")
        if len(self.workers) >= MAX_WORKERS:
            return web.Response(status=429, text="too many agent workers on this node")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, autoping=True)
        await ws.prepare(request)
        worker = await self._register(ws, claims.api_key)
        if worker is None:
            await ws.close()
            return ws
        self.workers[worker.worker_id] = worker
        await self.store.put_worker(worker.record)
        log.info("%s registered (type %s, version %s)", worker, agent_pb.JobType.Name(worker.record.job_type),
                 worker.record.version)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.ERROR:
                        break
                    continue
                try:
                    await worker.handle(agent_pb.WorkerMessage.FromString(msg.data))
                except DecodeError:
                    log.info("%s sent an undecodable message; closing", worker)
                    break
        finally:
            self.workers.pop(worker.worker_id, None)
            worker.close()
            try:
                await self.store.remove_worker(worker.worker_id)  # its jobs are re-dispatched by a router
            except Exception as exc:
                log.warning("could not remove %s from the store: %r", worker, exc)
            log.info("%s went away with %d running jobs", worker, len(worker.running))
            await ws.close()
        return ws

    async def _register(self, ws: web.WebSocketResponse, api_key: str) -> WorkerConnection | None:
        """The first messages until `register` (pings answered), within REGISTER_TIMEOUT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REGISTER_TIMEOUT
        while True:
            try:
                msg = await ws.receive(timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.info("agent worker did not register within %.0f s", REGISTER_TIMEOUT)
                return None
            if msg.type != WSMsgType.BINARY:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    return None
                continue
            try:
                message = agent_pb.WorkerMessage.FromString(msg.data)
            except DecodeError:
                return None
            kind = message.WhichOneof("message")
            if kind == "ping":
                await ws.send_bytes(agent_pb.ServerMessage(pong=agent_pb.WorkerPong(
                    last_timestamp=message.ping.timestamp)).SerializeToString())
                continue
            if kind != "register":
                log.info("agent worker sent %s before registering; closing", kind)
                return None
            register = message.register
            if register.type not in agent_pb.JobType.values():
                log.info("agent worker registered an unknown job type %d", register.type)
                return None
            worker = WorkerConnection(ws, register, self.node_id, api_key, self.keys.secret(api_key) or "",
                                      self.store)
            await worker.send(agent_pb.ServerMessage(register=agent_pb.RegisterWorkerResponse(
                worker_id=worker.worker_id, server_info=server_info(self.region, self.node_id))))
            return worker

    # --- the bus ------------------------------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            for worker in list(self.workers.values()):
                try:
                    await self.store.put_worker(worker.record)
                except Exception as exc:
                    log.warning("could not refresh %s: %r", worker, exc)

    async def _read_offers(self) -> None:
        async for data in self._subscription:
            try:
                message = decode(data)
            except ValueError:
                continue
            if message["kind"] == "offer":
                self._tasks.spawn(self._offer(message), "agent-offer")
            elif message["kind"] == "terminate":
                worker = self.workers.get(message.get("worker_id", ""))
                if worker is not None:
                    self._tasks.spawn(worker.terminate(message.get("job_id", "")), "agent-terminate")

    async def _offer(self, message: dict) -> None:
        request_id, reply_to = message.get("id", ""), message.get("reply_to", "")
        worker = self.workers.get(message.get("worker_id", ""))
        job = message_field(message, "job", agent_pb.Job)
        if worker is None or job is None:
            reply = encode("refused", id=request_id, reason="worker is not connected here")
        else:
            try:
                state = await worker.assign(job, bool(message.get("resuming")))
                reply = encode("assigned", id=request_id, state=state)
            except NotAvailable as exc:
                reply = encode("refused", id=request_id, reason=str(exc))
            except Exception as exc:
                log.exception("offering job %s to %s failed", job.id, worker)
                reply = encode("refused", id=request_id, reason=repr(exc))
        if reply_to:
            await self.bus.publish(reply_to, reply)


def add_agent_routes(app: web.Application, hub: AgentHub) -> None:
    app.router.add_get("/agent", hub.handle)
    app["agent_hub"] = hub
