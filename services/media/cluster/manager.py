"""The media node's part in the cluster: room links on the bus, the relay socket and links, store recovery.

`MediaNode` owns one `Cluster`: `start()` binds the relay socket (node IP, inside the node's UDP port range),
`room_link(room)` gives each Room its `RoomLink`, `servicer` is registered on the node's gRPC server
(`Relay.Link`). A watcher notices when the store comes back after an outage and re-asserts what this node hosts
(rooms, its claims, its participants), since a Redis restarted without persistence has forgotten all of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from livekit.protocol import models

from braid.shared.rpc import Channels, InternalTLS

from ..publisher import PublishedTrack
from .control import OriginConnection, RelayServicer, origin_tick
from .sealing import cluster_key
from .events import RoomLink
from .load import LoadMeter
from .relay import OutboundLink, RelayEndpoint
from ..interfaces import MediaNode, Room

if TYPE_CHECKING:
    from .remote import RemoteParticipant

log = logging.getLogger(__name__)

TICK = 1.0
STORE_CHECK = 1.0
STORE_TIMEOUT = 3.0
PING_TIMEOUT = 2.0  # a stalled Redis (a refused connection fails at once); joins are refused once a ping failed


class Cluster:
    def __init__(self, node: MediaNode):
        self.node = node
        self.node_id = node.node_id
        self.address = node.grpc_address
        self.store = node.store
        self.bus = node.bus
        self.endpoint = RelayEndpoint()
        self.sealing_key = cluster_key(node.config.keys)
        self.channels = Channels(InternalTLS.from_config(node.config.internal_tls))
        self.origins: dict[str, OriginConnection] = {}
        self.outbound: set[OutboundLink] = set()
        self.servicer = RelayServicer(self)
        self.load = LoadMeter()
        self.store_ok = True
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.endpoint.open(self.node.ports, self.node.config.rtc.node_ip)
        self._tasks = [
            asyncio.create_task(self._tick_loop(), name="cluster-tick"),
            asyncio.create_task(self._watch_store(), name="cluster-store-watch"),
        ]
        log.info("relay socket on %s:%d", self.endpoint.host, self.endpoint.port)

    async def stop(self) -> None:
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await asyncio.gather(*(o.close() for o in self.origins.values()), return_exceptions=True)
        self.origins.clear()
        for link in list(self.outbound):
            link.close()
        self.outbound.clear()
        self.endpoint.close()
        await self.channels.close()

    def metrics(self) -> dict[str, float]:
        """Relay traffic of this node (both directions, every link), for `/metrics`."""
        endpoint = self.endpoint
        return {
            "braid_relay_bytes_sent_total": endpoint.bytes_out,
            "braid_relay_video_bytes_sent_total": endpoint.video_bytes_out,
            "braid_relay_bytes_received_total": endpoint.bytes_in,
            "braid_relay_packets_sent_total": endpoint.packets_out,
            "braid_relay_packets_received_total": endpoint.packets_in,
            "braid_relay_links_out": len(self.outbound),
            "braid_relay_links_in": sum(1 for conn in self.origins.values() if conn.connected),
        }

    def spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- rooms ---------------------------------------------------------------------------------------------------

    def room_link(self, room: Room) -> RoomLink:
        return RoomLink(self, room)

    def local_track(self, room_name: str, track_sid: str) -> PublishedTrack | None:
        room = self.node.rooms.get(room_name)
        if room is None:
            return None
        for p in room.participants.values():
            track = p.publisher.tracks.get(track_sid)
            if track is not None and not track.up.closed:
                return track
        return None

    def origin(self, node_id: str, address: str) -> OriginConnection:
        conn = self.origins.get(node_id)
        if conn is not None and conn.address != address:  # the node restarted on another address
            if conn.tracks:
                conn.address = address  # its next (re)connection goes there
            else:
                conn.closed = True
                self.spawn(conn.close(), f"relay-close-{node_id}")
                conn = None
        if conn is None or conn.closed:
            conn = OriginConnection(self, node_id, address)
            self.origins[node_id] = conn
        return conn

    def forget_remote(self, room: Room, rp: RemoteParticipant) -> None:
        """A participant whose node went silent: remove it from the store; whoever removes it sends the webhook."""
        self.spawn(self._forget(room, rp), f"forget-{rp.sid}")

    async def _forget(self, room: Room, rp: RemoteParticipant) -> None:
        """Only a node the registry also lost is gone: one merely silent on the bus (a stall) still hosts its
        participants, and they come back with its next roster. Several nodes may end the same participant: its
        webhook has a stable id, so the outbox takes it once."""
        try:
            if rp.node_id and await asyncio.wait_for(self.node.registry.get(rp.node_id), STORE_TIMEOUT) is not None:
                log.info("%s: %s is silent on the bus but its node is alive; keeping its record", room.name, rp)
                return
            log.info("%s: %s removed (its media node is gone)", room.name, rp)
            self.node.hooks.participant_gone(room.info(), rp.info, models.DisconnectReason.CONNECTION_TIMEOUT)
            await self.node.hooks.flush()
            await asyncio.wait_for(self.store.delete_participant(room.name, rp.identity, rp.sid), STORE_TIMEOUT)
        except Exception as exc:
            log.info("could not remove %s from the store: %r", rp, exc)

    # --- periodic --------------------------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for room in list(self.node.rooms.values()):
                try:
                    room.link.tick(now)
                except Exception:
                    log.exception("room %s: cluster tick failed", room.name)
            for node_id, conn in list(self.origins.items()):
                if conn.idle(now):
                    del self.origins[node_id]
                    conn.closed = True  # a later want() goes to a new connection
                    self.spawn(conn.close(), f"relay-close-{node_id}")
            for link in list(self.outbound):
                try:
                    origin_tick(link)
                except Exception:
                    log.exception("relay link to %s: tick failed", link.peer)

    async def _watch_store(self) -> None:
        ping = getattr(self.store, "ping", None)
        if ping is None:
            return
        while True:
            await asyncio.sleep(STORE_CHECK)
            try:
                ok = bool(await asyncio.wait_for(ping(), PING_TIMEOUT))
            except asyncio.CancelledError:
                raise
            except Exception:
                ok = False
            if ok and not self.store_ok:
                log.info("store reachable again; re-asserting this node's rooms and participants")
                try:
                    await self.reassert()
                    self.store_ok = True
                    await self.node.heartbeat()  # placeable again, now that joins are taken
                except Exception as exc:
                    log.warning("re-asserting state failed (%r); retrying", exc)
                    ok = False
            elif not ok and self.store_ok:
                log.warning("store unreachable: calls in progress continue, new joins are refused")
            self.store_ok = ok

    async def reassert(self) -> None:
        """Put back what a store that lost its data forgot: rooms (kept if present), claims, participants."""
        store = self.store
        for room in list(self.node.rooms.values()):
            if room.closed:
                continue
            await store.create_room(room.info())
            await store.claim_room_node(room.name, self.node_id, room.claim_token)
            for p in list(room.participants.values()):
                if not p.closed:
                    await store.put_participant(room.name, p.info())
            room.link.request_snapshot()
            room.link.announce_all()
