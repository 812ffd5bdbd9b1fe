"""The media node: hosts participants, runs their WebRTC transports and forwards their media.

The server assembly builds `MediaNode(...)`, registers `node.servicer` on its grpc.aio server, and calls
`start()` / `stop()`. The node heartbeats itself into the registry as role "media" and keeps the store's
participant records current (the router and RoomService read them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiortc.rtcdtlstransport import RTCCertificate
from livekit.protocol import models

from braid.rpc import common_pb2, media_pb2_grpc
from braid.shared.auth import KeyProvider
from braid.shared.bus import Bus
from braid.shared.config import Config
from braid.shared.health import Refusals
from braid.shared.store import NodeInfo, NodeRegistry, RoomStore
from braid.shared.tracing import incoming_context, metadata_of, tracer

from .agent_targets import AgentTargetHooks
from .admin import Admin
from .cluster import Cluster
from . import fastpath
from .drain import Drain
from .hooks import Hooks, TelemetryHooks
from .telemetry import TelemetryService
from .ice import IceHost, PortRange
from .icemux import detect_ipv6, node_ice_host
from .room import JoinError, Room
from .session import run_session
from .speakers import UPDATE_INTERVAL as SPEAKER_INTERVAL

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TTL = 8.0
TICK_INTERVAL = 1.0
EMPTY_ROOM_LINGER = 5.0
NODE_LIMITS = {"participants": "node_participants", "tracks": "node_tracks", "bytes/s": "node_bandwidth"}


class MediaServicer(media_pb2_grpc.MediaServicer):
    def __init__(self, node: MediaNode):
        self.node = node

    async def Session(self, request_iterator, context):
        # The join's span: from the first message to the first reply (JoinResponse, reconnect or error).
        span = tracer.start_span("media.session.start", context=incoming_context(metadata_of(context)),
                                 attributes={"braid.media_node": self.node.node_id})
        try:
            async for down in run_session(self.node, request_iterator):
                if span is not None:
                    span.set_attribute("braid.first_reply", down.WhichOneof("message") or "")
                    span.end()
                    span = None
                yield down
        finally:
            if span is not None:
                span.end()

    async def Administer(self, request: common_pb2.RoomCall, context) -> common_pb2.RoomReply:
        return await self.node.admin.handle(request)


class MediaNode:
    def __init__(
        self,
        config: Config,
        store: RoomStore,
        bus: Bus,
        registry: NodeRegistry,
        notifier,
        node_id: str,
        grpc_address: str,
    ):
        self.config = config
        self.store = store
        self.bus = bus
        self.registry = registry
        self.notifier = notifier
        self.node_id = node_id
        self.grpc_address = grpc_address
        self.keys = KeyProvider(config.keys)
        self.send_path = fastpath.choose(config.rtc.fast_path, config.rtc.udp_gso)  # the forwarding send path, chosen once
        self.ports = PortRange(config.rtc.port_range_start, config.rtc.port_range_end,
                               host=config.rtc.bind_ip or config.rtc.node_ip,
                               open_endpoint=fastpath.endpoint_factory(self.send_path))
        self.ice: IceHost | None = None  # the ICE sockets, bound by start()
        self.certificate = RTCCertificate.generateCertificate()
        self.telemetry = TelemetryService.from_config(config.telemetry, notifier)
        self.agent_targets = AgentTargetHooks(TelemetryHooks(self.telemetry), bus)
        self.hooks: Hooks = self.agent_targets
        self.rooms: dict[str, Room] = {}
        self.refusals = Refusals()  # what the limits refused, for /metrics
        self.admin = Admin(self)
        self.cluster = Cluster(self)  # bus events of rooms spanning nodes, the node-to-node relay
        self.servicer = MediaServicer(self)
        self.state = "SERVING"
        self.drain = Drain(self, config.drain_deadline)
        self.started_at = time.time()
        self._empty_since: dict[str, float] = {}
        self._joining = 0  # joins admitted and not yet finished (see `admit`)
        self._announce: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        rtc = self.config.rtc
        node_ip6 = detect_ipv6() if rtc.node_ip6 == "auto" else rtc.node_ip6
        # The default ports give way to free ones when taken (a second server on one machine); configured ones don't.
        self.ice = await node_ice_host(
            rtc.node_ip, rtc.udp_port, rtc.tcp_port, self.ports, node_ip6, bind_ip=rtc.bind_ip,
            busy_fallback=frozenset(k for k in ("udp", "tcp") if not self.config.is_set(f"rtc.{k}_port")),
            open_endpoint=fastpath.endpoint_factory(self.send_path))
        await self.telemetry.start()
        await self.cluster.start()
        await self.heartbeat()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="media-heartbeat"),
            asyncio.create_task(self._tick_loop(), name="media-tick"),
        ]
        udp = f"UDP port {self.ice.udp_port}" if rtc.udp_port else f"UDP ports {self.ports.start}-{self.ports.end}"
        tcp = f", ICE-TCP port {self.ice.tcp_port}" if rtc.tcp_port else ""
        log.info("media node %s serving on %s (%s%s, node IP %s%s); forwarding path: %s", self.node_id,
                 self.grpc_address, udp, tcp, rtc.node_ip, f" and {node_ip6}" if node_ip6 else "",
                 fastpath.describe(self.send_path, rtc.fast_path))

    async def set_state(self, state: str) -> None:
        """SERVING or DRAINING; told to the registry at once so the router stops (or resumes) placing here."""
        self.state = state
        try:
            await asyncio.wait_for(self.heartbeat(), 2.0)
        except Exception as exc:
            log.warning("could not announce state %s: %r", state, exc)

    async def stop(self) -> None:
        await self.drain.cancel(resume_serving=False)
        await self.set_state("DRAINING")
        for room in list(self.rooms.values()):
            try:
                await asyncio.wait_for(room.close(models.DisconnectReason.SERVER_SHUTDOWN), 5.0)
            except Exception:
                log.exception("closing room %s failed", room.name)
        self.rooms.clear()
        await self.cluster.stop()
        if self._announce is not None:
            self._tasks.append(self._announce)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.agent_targets.close()
        try:
            await self.registry.remove(self.node_id)
        except Exception:
            log.warning("could not deregister media node %s", self.node_id)
        await self.telemetry.stop()
        if self.ice is not None:
            self.ice.close()

    def node_info(self) -> NodeInfo:
        participants = sum(len(r.participants) for r in self.rooms.values()) + self._joining
        # Tracks in and out: published here, and every subscription of a participant hosted here.
        tracks = sum(len(p.publisher.tracks) + len(p.subscriber.subs)
                     for r in self.rooms.values() for p in r.participants.values())
        bytes_per_second, cpu_load = self.cluster.load.sample(self)
        limits = self.config.limits
        return NodeInfo(
            node_id=self.node_id, role="media", address=self.grpc_address, region=self.config.region,
            state=self.state, participants=participants, tracks=tracks, started_at=self.started_at,
            bytes_per_second=bytes_per_second, cpu_load=cpu_load, max_participants=limits.max_participants,
            max_tracks=limits.max_tracks, max_bytes_per_second=limits.max_bytes_per_second,
        )

    @contextlib.contextmanager
    def admit(self, room: str, identity: str):
        """Hold a slot for one join from its first step to its end, or refuse it if the node is at a hard limit.

        The check and the count happen before any await, so a burst of simultaneous joins is counted as it
        arrives (the router's view, from heartbeats, lags). A refusal is retryable: the edge places the participant
        on another node. Replacing a session of an identity already here does not add anyone.
        """
        hosted = self.rooms.get(room)
        if hosted is None or hosted.by_identity(identity) is None:
            full = self.node_info().over_limit()  # counts the joins in progress too
            if full:
                self.refusals.count(NODE_LIMITS[full.split()[0]])
                self._announce_load()
                raise JoinError("node_full", f"media node is full ({full})")
        self._joining += 1
        try:
            yield
        finally:
            self._joining -= 1

    def _announce_load(self) -> None:
        """Heartbeat now (once at a time), so the router stops choosing a node that just refused a join."""
        if self._announce is None or self._announce.done():
            self._announce = asyncio.create_task(self._heartbeat_quietly(), name="media-announce-load")

    async def _heartbeat_quietly(self) -> None:
        try:
            await asyncio.wait_for(self.heartbeat(), 2.0)
        except Exception as exc:
            log.debug("load announcement failed: %r", exc)

    async def heartbeat(self) -> None:
        if not self.cluster.store_ok:
            return  # joins here are refused until the store is back and this node's state is in it again
        await self.registry.heartbeat(self.node_info(), HEARTBEAT_TTL)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self.heartbeat()
            except Exception as exc:
                log.warning("media heartbeat failed: %r", exc)

    async def _tick_loop(self) -> None:
        """Speaker updates every 0.4 s; RTCP reports, liveness and empty rooms every second."""
        last_full = 0.0
        while True:
            await asyncio.sleep(SPEAKER_INTERVAL)
            now = time.monotonic()
            full = now - last_full >= TICK_INTERVAL - 0.05
            if full:
                last_full = now
            for room in list(self.rooms.values()):
                try:
                    room.speaker_tick()
                    if full:
                        room.tick(now)
                except Exception:
                    log.exception("room %s tick failed", room.name)
                if not full:
                    continue
                if room.participants:
                    self._empty_since.pop(room.name, None)
                elif now - self._empty_since.setdefault(room.name, now) >= EMPTY_ROOM_LINGER:
                    self.drop_room(room)

    # --- rooms -----------------------------------------------------------------------------------------

    async def room_for(self, name: str) -> Room:
        if self.state != "SERVING":
            raise JoinError("unavailable", "media node is draining")
        if not self.cluster.store_ok:  # known already: refuse now rather than after the store call times out
            raise JoinError("unavailable", "the room store is unreachable")
        stored = await self.store.get_room(name)
        if stored is None:
            raise JoinError("not_found", "requested room does not exist")
        room = self.rooms.get(name)
        if room is not None and room.sid != stored.sid and not room.participants:
            self.drop_room(room)
            room = None
        if room is None:
            room = Room(self, stored)
            self.rooms[name] = room
            await room.link.start()
        else:
            room.update_info(stored)
        self._empty_since.pop(name, None)
        await self.store.claim_room_node(name, self.node_id, room.claim_token)
        return room

    def room_empty(self, room: Room) -> None:
        """The last participant left; the room is dropped after a short linger (a rejoin keeps it)."""
        self._empty_since.setdefault(room.name, time.monotonic())

    def drop_room(self, room: Room) -> None:
        if self.rooms.get(room.name) is not room:
            return
        del self.rooms[room.name]
        self._empty_since.pop(room.name, None)
        task = asyncio.create_task(self._release(room), name=f"release-{room.name}")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _release(self, room: Room) -> None:
        await room.stop()
        try:
            await self.store.release_room_node(room.name, self.node_id, room.claim_token)
        except Exception:
            log.warning("could not release room %s", room.name)
