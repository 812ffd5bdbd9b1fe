"""Data packets as LiveKit treats them: whose identity a packet carries, what is forwarded, and RPC calls the
server itself makes (RoomService `PerformRpc`)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from livekit.protocol import models

AGENT = models.ParticipantInfo.Kind.AGENT

# livekit/protocol utils/data_channel_rpc.go
RPC_MAX_ROUND_TRIP = 2.0
RPC_DEFAULT_RESPONSE_TIMEOUT_MS = 10_000
RPC_MAX_PAYLOAD_BYTES = 15 * 1024
RPC_CONNECTION_TIMEOUT = 1501
RPC_RESPONSE_TIMEOUT = 1502
RPC_RECIPIENT_DISCONNECTED = 1503
RPC_REQUEST_PAYLOAD_TOO_LARGE = 1402
RPC_MESSAGES = {
    RPC_CONNECTION_TIMEOUT: "Connection timeout",
    RPC_RESPONSE_TIMEOUT: "Response timeout",
    RPC_RECIPIENT_DISCONNECTED: "Recipient disconnected",
    RPC_REQUEST_PAYLOAD_TOO_LARGE: "Request payload too large",
    1500: "Application error in method handler",
    1504: "Response payload too large",
    1505: "Failed to send",
    1400: "Method not supported at destination",
    1401: "Recipient not found",
    1403: "RPC not supported by server",
    1404: "Unsupported RPC version",
}
# The Twirp code LiveKit answers for each RPC error code (its psrpc mapping); application errors are internal.
RPC_TWIRP_CODES = {
    RPC_CONNECTION_TIMEOUT: "canceled", RPC_RESPONSE_TIMEOUT: "canceled", RPC_RECIPIENT_DISCONNECTED: "unavailable",
    1504: "malformed", 1505: "internal", 1400: "invalid_argument", 1401: "not_found",
    RPC_REQUEST_PAYLOAD_TOO_LARGE: "malformed", 1403: "unimplemented", 1404: "unimplemented",
}


def is_agent(kind: int, permission: models.ParticipantPermission) -> bool:
    return kind == AGENT or permission.agent


def stamp_sender(packet: models.DataPacket, identity: str, sid: str, hidden: bool, agent: bool) -> bool:
    """Set the sender on a packet a client sent; False when it is not forwarded to other participants.

    The server asserts the sender's identity, except where LiveKit lets an agent publish on behalf of a
    participant (chat messages and text streams it marks `generated`). Hidden senders are anonymous.
    """
    own_identity, own_sid = ("", "") if hidden else (identity, sid)
    override = True
    kind = packet.WhichOneof("value")
    if kind == "user":
        packet.user.participant_identity = own_identity
        packet.user.participant_sid = own_sid
        if packet.destination_identities:
            packet.user.destination_identities[:] = packet.destination_identities
        else:
            packet.destination_identities[:] = packet.user.destination_identities
    elif kind == "transcription":
        if not agent:
            return False  # only agents publish transcriptions; the transcribed identity is inside and kept
    elif kind == "chat_message":
        if agent and packet.participant_identity and packet.participant_identity != identity:
            override = False
            packet.chat_message.generated = True
    elif kind == "stream_header":
        if (agent and packet.participant_identity and packet.participant_identity != identity
                and packet.stream_header.WhichOneof("content_header") == "text_header"):
            override = False
            packet.stream_header.text_header.generated = True
    elif kind == "metrics":
        return False  # no metrics subscribers here
    if override:
        packet.participant_identity = own_identity
    packet.participant_sid = own_sid
    return True


class RpcFailed(Exception):
    def __init__(self, code: int, data: str = ""):
        self.code = code
        self.message = RPC_MESSAGES.get(code, "RPC error")
        self.data = data
        super().__init__(f"RpcError {code}: {self.message}" + (f": {data}" if data else ""))

    @property
    def twirp_code(self) -> str:
        return RPC_TWIRP_CODES.get(self.code, "internal")


@dataclass
class _Call:
    acked: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    answered: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ServerRpc:
    """RPC requests the server sends one participant, and the acks and responses that answer them."""

    MAX_PENDING = 256

    def __init__(self) -> None:
        self._calls: dict[str, _Call] = {}

    def take(self, packet: models.DataPacket) -> bool:
        """Consume an ack or response to one of the server's own requests (True), else leave it to be relayed."""
        kind = packet.WhichOneof("value")
        if kind == "rpc_ack":
            call = self._calls.get(packet.rpc_ack.request_id)
            if call is None:
                return False
            if not call.acked.done():
                call.acked.set_result(None)
            return True
        if kind == "rpc_response":
            call = self._calls.get(packet.rpc_response.request_id)
            if call is None:
                return False
            if not call.answered.done():
                call.answered.set_result(packet.rpc_response)
            if not call.acked.done():
                call.acked.set_result(None)
            return True
        return False

    async def perform(self, send, method: str, payload: str, response_timeout_ms: int) -> str:
        """Send `rpc_request` through `send(packet) -> bool` and wait as LiveKit does: an ack within the round
        trip allowance, then the response within `response_timeout_ms`."""
        if len(payload.encode()) > RPC_MAX_PAYLOAD_BYTES:
            raise RpcFailed(RPC_REQUEST_PAYLOAD_TOO_LARGE)
        if len(self._calls) >= self.MAX_PENDING:
            raise RpcFailed(1505, "too many RPC calls in flight")
        timeout_ms = response_timeout_ms if response_timeout_ms > 0 else RPC_DEFAULT_RESPONSE_TIMEOUT_MS
        request_id = str(uuid.uuid4())
        call = self._calls[request_id] = _Call()
        try:
            packet = models.DataPacket(  # the request id stands in as the caller, so answers come back here
                kind=models.DataPacket.RELIABLE, participant_identity=request_id,
                rpc_request=models.RpcRequest(id=request_id, method=method, payload=payload,
                                              response_timeout_ms=timeout_ms, version=1),
            )
            if not send(packet):
                raise RpcFailed(1505)
            try:
                await asyncio.wait_for(asyncio.shield(call.acked), RPC_MAX_ROUND_TRIP)
            except asyncio.TimeoutError:
                raise RpcFailed(RPC_CONNECTION_TIMEOUT) from None
            try:
                response = await asyncio.wait_for(asyncio.shield(call.answered), timeout_ms / 1000)
            except asyncio.TimeoutError:
                raise RpcFailed(RPC_RESPONSE_TIMEOUT) from None
        finally:
            self._calls.pop(request_id, None)
        if response.WhichOneof("value") == "error":
            error = response.error
            failed = RpcFailed(error.code, error.data)
            failed.message = error.message or failed.message
            raise failed
        return response.payload

    def close(self) -> None:
        """The participant left: every call waiting on it fails as LiveKit's do."""
        for call in self._calls.values():
            waiting = call.answered if call.acked.done() else call.acked
            if not waiting.done():
                waiting.set_exception(RpcFailed(RPC_RECIPIENT_DISCONNECTED))
