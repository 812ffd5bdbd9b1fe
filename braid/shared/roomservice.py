"""The LiveKit RoomService methods: their livekit message types and the grant each one needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Type

from google.protobuf.message import Message
from livekit.protocol import agent_dispatch as dispatch_pb
from livekit.protocol import models
from livekit.protocol import room as room_pb

from braid.shared.auth import Claims


@dataclass(frozen=True)
class Method:
    name: str
    request: Type[Message]
    response: Type[Message]
    grant: str  # "create" | "list" | "admin"
    implemented: bool = True

    def room_of(self, request: Message) -> str:
        """The room a request acts on, for the room-scoped admin grant."""
        return getattr(request, "room", "") or getattr(request, "name", "")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("CreateRoom", room_pb.CreateRoomRequest, models.Room, "create"),
        Method("ListRooms", room_pb.ListRoomsRequest, room_pb.ListRoomsResponse, "list"),
        Method("DeleteRoom", room_pb.DeleteRoomRequest, room_pb.DeleteRoomResponse, "create"),
        Method("UpdateRoomMetadata", room_pb.UpdateRoomMetadataRequest, models.Room, "admin"),
        Method("ListParticipants", room_pb.ListParticipantsRequest, room_pb.ListParticipantsResponse, "admin"),
        Method("GetParticipant", room_pb.RoomParticipantIdentity, models.ParticipantInfo, "admin"),
        Method("RemoveParticipant", room_pb.RoomParticipantIdentity, room_pb.RemoveParticipantResponse, "admin"),
        Method("MutePublishedTrack", room_pb.MuteRoomTrackRequest, room_pb.MuteRoomTrackResponse, "admin"),
        Method("UpdateParticipant", room_pb.UpdateParticipantRequest, models.ParticipantInfo, "admin"),
        Method("UpdateSubscriptions", room_pb.UpdateSubscriptionsRequest, room_pb.UpdateSubscriptionsResponse, "admin"),
        Method("SendData", room_pb.SendDataRequest, room_pb.SendDataResponse, "admin"),
        # Moving participants between rooms needs the cluster issue's session hand-over.
        Method("ForwardParticipant", room_pb.ForwardParticipantRequest, room_pb.ForwardParticipantResponse,
               "admin", implemented=False),
        Method("MoveParticipant", room_pb.MoveParticipantRequest, room_pb.MoveParticipantResponse,
               "admin", implemented=False),
        Method("PerformRpc", room_pb.PerformRpcRequest, room_pb.PerformRpcResponse, "admin"),
    )
}


# AgentDispatchService (livekit_agent_dispatch.proto): every method needs roomAdmin on the dispatch's room.
DISPATCH_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("CreateDispatch", dispatch_pb.CreateAgentDispatchRequest, dispatch_pb.AgentDispatch, "admin"),
        Method("DeleteDispatch", dispatch_pb.DeleteAgentDispatchRequest, dispatch_pb.AgentDispatch, "admin"),
        Method("ListDispatch", dispatch_pb.ListAgentDispatchRequest, dispatch_pb.ListAgentDispatchResponse, "admin"),
    )
}
SERVICES: dict[str, dict[str, Method]] = {"RoomService": METHODS, "AgentDispatchService": DISPATCH_METHODS}
ALL_METHODS: dict[str, Method] = {**METHODS, **DISPATCH_METHODS}


def permission_error(method: Method, claims: Claims, request: Message) -> str | None:
    """Why `claims` may not call `method` on `request`, or None when it may."""
    video = claims.video
    if method.grant == "create" and not video.room_create:
        return "requires roomCreate grant"
    if method.grant == "list" and not video.room_list:
        return "requires roomList grant"
    if method.grant == "admin":
        if not video.room_admin:
            return "requires roomAdmin grant"
        room = method.room_of(request)
        if video.room and room != video.room:
            return f"token is for room {video.room!r}, not {room!r}"
        if not video.room:
            return "roomAdmin grant must name a room"
    return None


RPC_ROUND_TRIP = 2.0  # LiveKit's allowance for the ack of a data-channel RPC
RPC_DEFAULT_TIMEOUT_MS = 10_000


def call_deadline(call, default: float, hops: int = 1) -> float:
    """How long an internal call may wait for `call`, `hops` calls before the media node: a PerformRpc waits as
    long as its response may take, with `default` to spare per hop."""
    if call.method != "PerformRpc":
        return default
    try:
        timeout_ms = room_pb.PerformRpcRequest.FromString(call.request).response_timeout_ms
    except Exception:
        return default
    return (timeout_ms or RPC_DEFAULT_TIMEOUT_MS) / 1000 + RPC_ROUND_TRIP + hops * default
