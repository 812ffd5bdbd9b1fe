"""RoomService calls on the participants this media node hosts (`Media.Administer`).

`request` / `response` are the serialized livekit messages of the RoomService method named by `method`; a room or
participant this node does not host answers `not_found`, which the router reads as "try the next node".
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError, Message
from livekit.protocol import models
from livekit.protocol import room as room_pb
from livekit.protocol import rtc as rtc_pb

from braid.rpc import common_pb2
from braid.shared.roomservice import METHODS

from .data import RpcFailed
from .interfaces import MediaNode, Participant, Room


log = logging.getLogger(__name__)
Reason = models.DisconnectReason


class CallError(Exception):
    def __init__(self, code: str, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


class Admin:
    def __init__(self, node: MediaNode):
        self.node = node

    async def handle(self, call: common_pb2.RoomCall) -> common_pb2.RoomReply:
        method = METHODS.get(call.method)
        handler = getattr(self, "_" + call.method, None)
        if method is None or handler is None:
            return _fail("unimplemented", f"{call.method} is not supported by the media service")
        try:
            request = method.request.FromString(call.request)
        except DecodeError:
            return _fail("malformed", "request is not a valid protobuf message")
        try:
            response: Message = await handler(request)
        except CallError as exc:
            return _fail(exc.code, exc.msg)
        return common_pb2.RoomReply(response=response.SerializeToString())

    def _room(self, name: str) -> Room:
        room = self.node.rooms.get(name)
        if room is None:
            raise CallError("not_found", f"room {name!r} is not hosted here")
        return room

    def _participant(self, room_name: str, identity: str) -> tuple[Room, Participant]:
        room = self._room(room_name)
        p = room.by_identity(identity)
        if p is None:
            raise CallError("not_found", f"participant {identity!r} is not in room {room_name!r}")
        return room, p

    async def _ListParticipants(self, req: room_pb.ListParticipantsRequest) -> Message:
        room = self._room(req.room)
        return room_pb.ListParticipantsResponse(participants=[p.info() for p in room.participants.values()])

    async def _GetParticipant(self, req: room_pb.RoomParticipantIdentity) -> Message:
        return self._participant(req.room, req.identity)[1].info()

    async def _RemoveParticipant(self, req: room_pb.RoomParticipantIdentity) -> Message:
        room, p = self._participant(req.room, req.identity)
        await room.remove(p, Reason.PARTICIPANT_REMOVED, send_leave=True)
        return room_pb.RemoveParticipantResponse()

    async def _MutePublishedTrack(self, req: room_pb.MuteRoomTrackRequest) -> Message:
        _, p = self._participant(req.room, req.identity)
        if req.track_sid not in p.publisher.tracks:
            raise CallError("not_found", f"track {req.track_sid!r} is not published by {req.identity!r}")
        track = p.set_track_muted(req.track_sid, req.muted)
        p.send(rtc_pb.SignalResponse(mute=rtc_pb.MuteTrackRequest(sid=req.track_sid, muted=req.muted)))
        return room_pb.MuteRoomTrackResponse(track=track.info if track else None)

    async def _UpdateParticipant(self, req: room_pb.UpdateParticipantRequest) -> Message:
        room, p = self._participant(req.room, req.identity)
        problem = p.fields_problem(req.name, req.metadata, req.attributes)
        if problem is not None:
            self.node.refusals.count(problem[0])
            raise CallError("invalid_argument", problem[1])
        p.update_fields(req.name, req.metadata, req.attributes)
        if req.HasField("permission"):
            before = p.permission
            p.permission = models.ParticipantPermission()
            p.permission.CopyFrom(req.permission)
            if before.can_subscribe and not p.permission.can_subscribe:
                for sid in list(p.subscriber.subs):
                    p.subscriber.unsubscribe(sid)
            if before.can_publish and not p.permission.can_publish:
                for track in list(p.publisher.tracks.values()):
                    room.unpublish(p, track, by_client=False)
        p.changed()
        return p.info()

    async def _UpdateSubscriptions(self, req: room_pb.UpdateSubscriptionsRequest) -> Message:
        room, p = self._participant(req.room, req.identity)
        sids = list(req.track_sids)
        for pt in req.participant_tracks:
            sids.extend(pt.track_sids)
        room.update_subscriptions(p, sids, req.subscribe)
        return room_pb.UpdateSubscriptionsResponse()

    async def _SendData(self, req: room_pb.SendDataRequest) -> Message:
        room = self._room(req.room)
        identities = list(req.destination_identities)
        for sid in req.destination_sids:
            target = room.participants.get(sid)
            if target is not None and target.identity not in identities:
                identities.append(target.identity)
        if req.destination_sids and not identities:
            return room_pb.SendDataResponse()
        user = models.UserPacket(payload=req.data, destination_identities=identities)
        if req.HasField("topic"):
            user.topic = req.topic
        if req.nonce:
            user.nonce = req.nonce
        reliable = req.kind == models.DataPacket.RELIABLE
        packet = models.DataPacket(kind=req.kind, destination_identities=identities, user=user)
        room.relay_data(None, packet, reliable, identities)
        return room_pb.SendDataResponse()

    async def _PerformRpc(self, req: room_pb.PerformRpcRequest) -> Message:
        _, p = self._participant(req.room, req.destination_identity)
        try:
            payload = await p.perform_rpc(req.method, req.payload, req.response_timeout_ms)
        except RpcFailed as exc:
            raise CallError(exc.twirp_code, str(exc)) from None
        return room_pb.PerformRpcResponse(payload=payload)

    async def _DeleteRoom(self, req: room_pb.DeleteRoomRequest) -> Message:
        room = self.node.rooms.get(req.room)
        if room is not None:
            await room.close(Reason.ROOM_DELETED)
            self.node.drop_room(room)
        return room_pb.DeleteRoomResponse()

    async def _UpdateRoomMetadata(self, req: room_pb.UpdateRoomMetadataRequest) -> Message:
        room = self._room(req.room)
        stored = await self.node.store.get_room(req.room)
        info = room.info()
        if stored is not None and stored.sid == room.sid:
            room.update_info(stored)
            info = room.info()
        else:
            info.metadata = req.metadata
            room.update_info(info)
        room.broadcast(rtc_pb.SignalResponse(room_update=rtc_pb.RoomUpdate(room=room.info())))
        return room.info()


def _fail(code: str, msg: str) -> common_pb2.RoomReply:
    return common_pb2.RoomReply(error=common_pb2.RpcError(code=code, msg=msg))
