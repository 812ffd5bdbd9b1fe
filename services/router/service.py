"""The Router gRPC service: RoomService calls on the directory, fan-out to media nodes, placement."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from livekit.protocol import agent_dispatch as dispatch_pb
from livekit.protocol import models
from livekit.protocol import room as room_pb

from braid.rpc import common_pb2, router_pb2, router_pb2_grpc
from braid.shared.roomservice import ALL_METHODS, call_deadline
from braid.shared.rpc import DEFAULT_DEADLINE, Channels, call_idempotent, rpc_error
from braid.shared.store import NodeRegistry, RoomStore, placement_claim_token
from braid.shared.tracing import incoming_context, metadata_of, tracer

from .agents import AgentDispatcher, DispatchError
from .placement import NodeSelector
from .rooms import RoomDirectory, validate_room_name

log = logging.getLogger(__name__)


class CallError(Exception):
    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _reply(message: Message) -> common_pb2.RoomReply:
    return common_pb2.RoomReply(response=message.SerializeToString())


async def _always_up() -> bool:
    return True


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        directory: RoomDirectory,
        registry: NodeRegistry,
        channels: Channels,
        selector: NodeSelector,
        auto_create: bool = True,
        dispatcher: AgentDispatcher | None = None,
        store_up: Callable[[], Awaitable[bool]] | None = None,
    ):
        self.selector = selector
        # Whether the store answers: placements fail at once while it is down (braid.server.Server.store_up_now)
        self.store_up = store_up or _always_up
        self.directory = directory
        self.store: RoomStore = directory.store
        self.registry = registry
        self.channels = channels
        self.auto_create = auto_create
        self.dispatcher = dispatcher

    # --- RoomService ---------------------------------------------------------------------------

    async def Administer(self, call: common_pb2.RoomCall, context) -> common_pb2.RoomReply:
        method = ALL_METHODS.get(call.method)
        if method is None or not method.implemented:
            return common_pb2.RoomReply(error=rpc_error("unimplemented", f"{call.method} is not supported"))
        try:
            request = method.request.FromString(call.request)
        except DecodeError:
            return common_pb2.RoomReply(error=rpc_error("malformed", "request is not a valid protobuf message"))
        handler = getattr(self, "_" + call.method, None) or self._on_media_nodes
        try:
            return await handler(call, request)
        except CallError as exc:
            return common_pb2.RoomReply(error=rpc_error(exc.code, exc.msg))

    async def _CreateRoom(self, call, request: room_pb.CreateRoomRequest) -> common_pb2.RoomReply:
        problem = validate_room_name(request.name)
        if problem:
            raise CallError("invalid_argument", problem)
        if min(request.empty_timeout, request.departure_timeout, request.max_participants) < 0:
            raise CallError("invalid_argument", "timeouts and max_participants must not be negative")
        room = self.directory.new_room(
            request.name,
            empty_timeout=request.empty_timeout,
            departure_timeout=request.departure_timeout,
            max_participants=request.max_participants,
            metadata=request.metadata,
        )
        stored, _ = await self.directory.ensure(room)
        return _reply(stored)

    async def _ListRooms(self, call, request: room_pb.ListRoomsRequest) -> common_pb2.RoomReply:
        rooms = await self.store.list_rooms(list(request.names) or None)
        return _reply(room_pb.ListRoomsResponse(rooms=rooms))

    async def _DeleteRoom(self, call, request: room_pb.DeleteRoomRequest) -> common_pb2.RoomReply:
        if await self.store.get_room(request.room) is None:
            raise CallError("not_found", f"room {request.room!r} does not exist")
        # Media nodes disconnect everyone first, so clients hear `leave` before the room vanishes.
        await self._fan_out(call, request.room, stop_at_first=False)
        await self.directory.finish(request.room, "deleted by RoomService")
        return _reply(room_pb.DeleteRoomResponse())

    async def _UpdateRoomMetadata(self, call, request: room_pb.UpdateRoomMetadataRequest) -> common_pb2.RoomReply:
        room = await self._room(request.room)
        room.metadata = request.metadata
        if not await self.store.update_room(room):
            raise CallError("not_found", f"room {request.room!r} does not exist")
        await self._fan_out(call, request.room, stop_at_first=False)
        return _reply(await self._room(request.room))

    async def _ListParticipants(self, call, request: room_pb.ListParticipantsRequest) -> common_pb2.RoomReply:
        await self._room(request.room)
        participants = await self.store.list_participants(request.room)
        return _reply(room_pb.ListParticipantsResponse(participants=participants))

    async def _GetParticipant(self, call, request: room_pb.RoomParticipantIdentity) -> common_pb2.RoomReply:
        await self._room(request.room)
        info = await self.store.get_participant(request.room, request.identity)
        if info is None:
            raise CallError("not_found", f"participant {request.identity!r} is not in room {request.room!r}")
        return _reply(info)

    async def _on_media_nodes(self, call, request: Message) -> common_pb2.RoomReply:
        """Participant-level calls go to the media nodes hosting the room."""
        room = getattr(request, "room", "")
        await self._room(room)
        identity = getattr(request, "identity", "")
        if identity and await self.store.get_participant(room, identity) is None:
            raise CallError("not_found", f"participant {identity!r} is not in room {room!r}")
        reply = await self._fan_out(call, room, stop_at_first=bool(identity))
        if reply is None:
            if identity:
                raise CallError("not_found", f"participant {identity!r} is not in room {room!r}")
            return _reply(ALL_METHODS[call.method].response())
        return reply

    async def _PerformRpc(self, call, request: room_pb.PerformRpcRequest) -> common_pb2.RoomReply:
        if not request.destination_identity:
            raise CallError("invalid_argument", "destination identity is required")
        await self._room(request.room)
        if await self.store.get_participant(request.room, request.destination_identity) is None:
            raise CallError("not_found", f"participant {request.destination_identity!r} is not in room "
                                         f"{request.room!r}")
        reply = await self._fan_out(call, request.room, stop_at_first=True)
        if reply is None:
            raise CallError("not_found", f"participant {request.destination_identity!r} is not in room "
                                         f"{request.room!r}")
        return reply

    # --- AgentDispatchService -----------------------------------------------------------------------

    def _agents(self) -> AgentDispatcher:
        if self.dispatcher is None:
            raise CallError("unimplemented", "agent dispatch is not enabled on this router")
        return self.dispatcher

    async def _CreateDispatch(self, call, request: dispatch_pb.CreateAgentDispatchRequest) -> common_pb2.RoomReply:
        problem = validate_room_name(request.room)
        if problem:
            raise CallError("invalid_argument", problem)
        dispatcher = self._agents()
        room = await self.store.get_room(request.room)
        if room is None:
            if not self.auto_create:
                raise CallError("not_found", f"room {request.room!r} does not exist")
            room, _ = await self.directory.ensure(self.directory.new_room(request.room))
        try:
            return _reply(await dispatcher.create(room, request))
        except DispatchError as exc:
            raise CallError(exc.code, exc.msg) from None

    async def _DeleteDispatch(self, call, request: dispatch_pb.DeleteAgentDispatchRequest) -> common_pb2.RoomReply:
        try:
            return _reply(await self._agents().delete(request.room, request.dispatch_id))
        except DispatchError as exc:
            raise CallError(exc.code, exc.msg) from None

    async def _ListDispatch(self, call, request: dispatch_pb.ListAgentDispatchRequest) -> common_pb2.RoomReply:
        dispatches = await self._agents().list(request.room, request.dispatch_id)
        return _reply(dispatch_pb.ListAgentDispatchResponse(agent_dispatches=dispatches))

    async def _host_of(self, room: str, identity: str, sid: str) -> str:
        """The media node hosting participant `sid`, so a resume through any signal node reaches its session."""
        live = {n.node_id: n for n in await self.registry.nodes("media")}
        call = common_pb2.RoomCall(
            method="GetParticipant", room=room,
            request=room_pb.RoomParticipantIdentity(room=room, identity=identity).SerializeToString(),
        )

        async def ask(node_id: str) -> str:
            node = live.get(node_id)
            if node is None:
                return ""
            try:
                reply = await self.channels.media(node.address).Administer(call, timeout=2.0)
            except grpc.aio.AioRpcError:
                return ""
            if reply.HasField("error"):
                return ""
            return node_id if models.ParticipantInfo.FromString(reply.response).sid == sid else ""

        found = await asyncio.gather(*(ask(n) for n in await self.store.room_nodes(room)))
        return next((n for n in found if n), "")

    async def _room(self, name: str) -> models.Room:
        room = await self.store.get_room(name)
        if room is None:
            raise CallError("not_found", f"room {name!r} does not exist")
        return room

    async def _fan_out(self, call, room: str, stop_at_first: bool) -> common_pb2.RoomReply | None:
        """Send `call` to every media node of `room`; the first success wins.

        A node that answers not_found does not host the participant; any other error is returned.
        """
        nodes = await self.store.room_nodes(room)
        live = {n.node_id: n for n in await self.registry.nodes("media")}
        success: common_pb2.RoomReply | None = None
        failure: common_pb2.RoomReply | None = None
        for node_id in nodes:
            node = live.get(node_id)
            if node is None:
                continue
            try:
                reply = await self.channels.media(node.address).Administer(
                    call, timeout=call_deadline(call, DEFAULT_DEADLINE))
            except grpc.aio.AioRpcError as exc:
                log.warning("media node %s unreachable for %s: %s", node_id, call.method, exc.code())
                failure = common_pb2.RoomReply(error=rpc_error("unavailable", f"media node {node_id} unreachable"))
                continue
            if reply.HasField("error"):
                if reply.error.code != "not_found":
                    failure = reply
                continue
            success = success or reply
            if stop_at_first:
                break
        return success or failure

    # --- Placement -----------------------------------------------------------------------------

    async def Place(self, request: router_pb2.PlaceRequest, context) -> router_pb2.Placement:
        with tracer.start_as_current_span(
            "router.place", context=incoming_context(metadata_of(context)),
            attributes={"braid.room": request.room, "braid.identity": request.identity},
        ) as span:
            placement = await self._place(request)
            span.set_attribute("braid.media_node", placement.node_id)
            span.set_attribute("braid.placement_reason", placement.reason or placement.error.msg)
            return placement

    async def _place(self, request: router_pb2.PlaceRequest) -> router_pb2.Placement:
        problem = validate_room_name(request.room)
        if problem:
            return router_pb2.Placement(error=rpc_error("invalid_argument", problem))
        if not await self.store_up():
            return router_pb2.Placement(error=rpc_error("unavailable", "the room store is unreachable"))
        room = await self.store.get_room(request.room)
        if room is None:
            if not (self.auto_create or request.create_if_missing):
                return router_pb2.Placement(error=rpc_error("not_found", "requested room does not exist"))
            room, _ = await self.directory.ensure(self.directory.new_room(request.room), _room_config(request))
        if room.max_participants:
            present = await self.store.get_participant(room.name, request.identity)
            if present is None and room.num_participants >= room.max_participants:
                return router_pb2.Placement(error=rpc_error("resource_exhausted", "room is full"))
        hosting = set(await self.store.room_nodes(room.name))
        prefer = request.prefer_node_id
        if not prefer and request.participant_sid:
            prefer = await self._host_of(room.name, request.identity, request.participant_sid)
        choice = self.selector.choose(
            await self.registry.nodes("media"), hosting, prefer=prefer, region=request.region,
            avoid=set(request.avoid_node_ids),
        )
        if choice.node is None:
            log.warning("cannot place %s in %s: %s", request.identity, room.name, choice.reason)
            return router_pb2.Placement(error=rpc_error("unavailable", choice.reason), reason=choice.reason)
        # Until the node's own claim replaces it, this one keeps the room's next placements together.
        await self.store.claim_room_node(room.name, choice.node.node_id, placement_claim_token(time.time()),
                                         if_absent=True)
        log.info("placed %s in %s on %s: %s", request.identity, room.name, choice.node.node_id, choice.reason)
        return router_pb2.Placement(
            node_id=choice.node.node_id,
            address=choice.node.address,
            room=room.SerializeToString(),
            reason=choice.reason,
        )


def _room_config(request: router_pb2.PlaceRequest) -> room_pb.RoomConfiguration | None:
    if not request.room_config:
        return None
    try:
        return room_pb.RoomConfiguration.FromString(request.room_config)
    except DecodeError:
        return None


async def administer(router: router_pb2_grpc.RouterStub, call: common_pb2.RoomCall) -> common_pb2.RoomReply:
    """Client-side helper: reads are retried, writes are sent once."""
    if call.method in ("ListRooms", "ListParticipants", "GetParticipant"):
        return await call_idempotent(lambda: router.Administer(call, timeout=DEFAULT_DEADLINE))
    return await router.Administer(call, timeout=call_deadline(call, DEFAULT_DEADLINE, hops=2))
