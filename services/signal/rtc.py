"""`/rtc`, `/rtc/validate`, `/rtc/v1`, `/rtc/v1/validate`: where LiveKit clients connect.

Everything is checked before the WebSocket upgrade (token, grant, join request, placement, and the media node's
first reply), so a failure is a plain HTTP status the SDKs understand: 401 bad token, 400 bad join request,
404 unknown room (or `/rtc/v1` switched off, which makes the SDKs fall back to `/rtc`), 429 full room,
503 router or media unreachable. After the upgrade the edge relays `SignalRequest`/`SignalResponse` frames as
bytes over the media node's `Session` stream; it bounds their size and never parses them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
import zlib

import grpc
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import common_pb2, media_pb2, router_pb2
from braid.shared.auth import AuthError, Claims, bearer_token, verify_join_token
from braid.shared.tracing import outgoing_metadata, tracer

from .context import SignalContext
from .failover import RECONNECT, FailedNodes

log = logging.getLogger(__name__)

MAX_FRAME = 512 * 1024  # a signal frame is an SDP at most; larger frames close the socket (1009)
MAX_JOIN_REQUEST = 1024 * 1024  # decoded (and decompressed) join_request, as LiveKit's DefaultMaxHeaderBytes
PLACE_TIMEOUT = 5.0
MAX_PLACEMENTS = 5  # a join refused by a full (or unreachable) node is placed again, avoiding it
NODE_FULL = "node_full"  # the media node's retryable refusal: it reached a hard limit
FIRST_REPLY_TIMEOUT = 10.0
CORS = {"Access-Control-Allow-Origin": "*"}
STATUS = {
    "invalid_argument": 400, "malformed": 400, "unauthenticated": 401, "permission_denied": 403,
    "not_found": 404, "resource_exhausted": 429, "unavailable": 503, "deadline_exceeded": 503, "node_full": 503,
}
ROOM_MISSING = "requested room does not exist"
SDKS = {
    "js": "JS", "swift": "SWIFT", "android": "ANDROID", "flutter": "FLUTTER", "go": "GO", "unity": "UNITY",
    "reactnative": "REACT_NATIVE", "react-native": "REACT_NATIVE", "rust": "RUST", "python": "PYTHON",
    "cpp": "CPP", "unity-web": "UNITY_WEB", "node": "NODE", "unreal": "UNREAL", "esp32": "ESP32",
    "dotnet": "DOTNET",
}


class _PlaceElsewhere(Exception):
    """The chosen media node refused the join in a way another node may not: place the participant again."""

    def __init__(self, node_id: str, reason: str):
        super().__init__(reason)
        self.node_id = node_id
        self.reason = reason


class Reject(Exception):
    """Answer the HTTP request with this status and message instead of upgrading."""

    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status
        self.msg = msg


def add_rtc_routes(app: web.Application, ctx: SignalContext) -> None:
    edge = RtcEdge(ctx)
    app.router.add_get("/rtc", edge.connect)
    app.router.add_get("/rtc/v1", edge.connect_v1)
    app.router.add_get("/rtc/validate", edge.validate)
    app.router.add_get("/rtc/v1/validate", edge.validate_v1)


# --- request checks -----------------------------------------------------------------------------------------


def decode_join_request(value: str) -> rtc_pb.JoinRequest:
    """`join_request`: base64url (padding optional) of a WrappedJoinRequest, its JoinRequest maybe gzipped."""
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise Reject(400, "cannot base64 decode wrapped join request") from None
    try:
        wrapped = rtc_pb.WrappedJoinRequest.FromString(raw)
    except DecodeError:
        raise Reject(400, "cannot unmarshal wrapped join request") from None
    data = wrapped.join_request
    if wrapped.compression == rtc_pb.WrappedJoinRequest.GZIP:
        try:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = inflater.decompress(data, MAX_JOIN_REQUEST + 1)
        except zlib.error:
            raise Reject(400, "cannot read decompressed join request") from None
        if len(data) > MAX_JOIN_REQUEST or inflater.unconsumed_tail:
            raise Reject(400, "join request too large")
    elif len(data) > MAX_JOIN_REQUEST:
        raise Reject(400, "join request too large")
    try:
        return rtc_pb.JoinRequest.FromString(data)
    except DecodeError:
        raise Reject(400, "cannot unmarshal join request") from None


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def join_request_from_query(query) -> rtc_pb.JoinRequest:
    """The v0 query parameters, as the JoinRequest the media node expects."""
    client = models.ClientInfo(
        sdk=models.ClientInfo.SDK.Value(SDKS.get(query.get("sdk", "").lower(), "UNKNOWN")),
        version=query.get("version", ""),
        os=query.get("os", ""),
        os_version=query.get("os_version", ""),
        device_model=query.get("device_model", ""),
        browser=query.get("browser", ""),
        browser_version=query.get("browser_version", ""),
        network=query.get("network", ""),
    )
    for name in ("protocol", "client_protocol"):
        try:
            setattr(client, name, int(query.get(name, "0") or 0))
        except ValueError:
            raise Reject(400, f"invalid {name}") from None
    join = rtc_pb.JoinRequest(
        client_info=client,
        connection_settings=rtc_pb.ConnectionSettings(
            auto_subscribe=_flag(query.get("auto_subscribe"), True),
            adaptive_stream=_flag(query.get("adaptive_stream"), False),
            disable_ice_lite=_flag(query.get("disable_ice_lite"), False),
        ),
        reconnect=_flag(query.get("reconnect"), False),
        participant_sid=query.get("sid", ""),
    )
    try:
        join.reconnect_reason = int(query.get("reconnect_reason", "0") or 0)
    except ValueError:
        pass
    attributes = query.get("attributes")
    if attributes:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(attributes + "=" * (-len(attributes) % 4)))
            join.participant_attributes.update({str(k): str(v) for k, v in dict(decoded).items()})
        except (ValueError, TypeError, binascii.Error):
            raise Reject(400, "cannot decode attributes") from None
    return join


def room_config_of(claims: Claims) -> bytes:
    """The token's `roomConfig` (camelCase JSON, as livekit-api writes it) as a serialized RoomConfiguration."""
    from livekit.protocol import room as room_pb

    value = claims.raw.get("roomConfig")
    if not isinstance(value, dict):
        return b""
    try:
        return json_format.ParseDict(value, room_pb.RoomConfiguration(), ignore_unknown_fields=True).SerializeToString()
    except (json_format.ParseError, ValueError, TypeError):
        raise Reject(400, "invalid roomConfig in token") from None


class RtcEdge:
    def __init__(self, ctx: SignalContext):
        self.ctx = ctx
        self.failed_nodes = FailedNodes()

    def _claims(self, request: web.Request) -> tuple[Claims, str]:
        token = bearer_token(request.headers.get("Authorization"), request.query.get("access_token"))
        try:
            return verify_join_token(token, self.ctx.keys), token
        except AuthError as exc:
            raise Reject(exc.status, str(exc)) from None

    def _join_request(self, request: web.Request, v1: bool) -> tuple[rtc_pb.JoinRequest, bool]:
        value = request.query.get("join_request")
        if value:
            return decode_join_request(value), True
        if v1:
            raise Reject(400, "join_request is required")
        return join_request_from_query(request.query), False

    # --- validate ---------------------------------------------------------------------------------------

    async def validate(self, request: web.Request) -> web.Response:
        return await self._validate(request, v1=False)

    async def validate_v1(self, request: web.Request) -> web.Response:
        if not self.ctx.config.rtc.enable_v1:
            # CORS too: a page on another origin must be able to read this 404 to fall back to v0.
            return web.Response(status=404, text="404: Not Found", headers=CORS)
        return await self._validate(request, v1=True)

    async def _validate(self, request: web.Request, v1: bool) -> web.Response:
        try:
            if not self.ctx.ready():
                raise Reject(503, "server is not ready")
            claims, _ = self._claims(request)
            self._join_request(request, v1)
            if not self.ctx.config.room.auto_create:
                await self._require_room(claims.video.room)
        except Reject as exc:
            log.info("rtc validate refused (%s): %s", exc.status, exc.msg)
            return web.Response(status=exc.status, text=exc.msg, headers=CORS)
        return web.Response(text="success", headers=CORS)

    async def _require_room(self, room: str) -> None:
        from livekit.protocol import room as room_pb

        call = common_pb2.RoomCall(method="ListRooms", room=room,
                                   request=room_pb.ListRoomsRequest(names=[room]).SerializeToString())
        try:
            reply = await self.ctx.call_router(lambda router: router.Administer(call, timeout=PLACE_TIMEOUT))
        except grpc.aio.AioRpcError:
            raise Reject(503, "router unavailable") from None
        if reply.HasField("error"):
            raise Reject(STATUS.get(reply.error.code, 500), reply.error.msg)
        if not room_pb.ListRoomsResponse.FromString(reply.response).rooms:
            raise Reject(404, ROOM_MISSING)

    # --- connect ----------------------------------------------------------------------------------------

    async def connect(self, request: web.Request) -> web.StreamResponse:
        return await self._connect(request, v1=False)

    async def connect_v1(self, request: web.Request) -> web.StreamResponse:
        if not self.ctx.config.rtc.enable_v1:
            return web.Response(status=404, text="404: Not Found")
        return await self._connect(request, v1=True)

    async def _connect(self, request: web.Request, v1: bool) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(status=404, text="404: Not Found")
        started = time.monotonic()
        call = None
        try:
            if not self.ctx.ready():
                raise Reject(503, "server is not ready")
            claims, token = self._claims(request)
            join, single_pc = self._join_request(request, v1)
            call, first = await self._start_session(request, claims, token, join, single_pc)
        except Reject as exc:
            if call is not None:
                call.cancel()
            log.info("rtc join refused (%s): %s", exc.status, exc.msg)
            return web.Response(status=exc.status, text=exc.msg)
        heartbeat = self.ctx.config.rtc.websocket_heartbeat or None  # a half-open socket is closed by it
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, autoping=True, heartbeat=heartbeat)
        try:
            await ws.prepare(request)
        except Exception:
            call.cancel()
            raise
        log.debug("%s joined %s in %.1f ms", claims.identity, claims.video.room, (time.monotonic() - started) * 1e3)
        await self._relay(ws, call, first)
        return ws

    async def _start_session(self, request: web.Request, claims: Claims, token: str, join: rtc_pb.JoinRequest,
                             single_pc: bool):
        # One trace per join: this span's context travels to the router and the media node in gRPC metadata.
        with tracer.start_as_current_span("signal.join", attributes={
            "braid.room": claims.video.room, "braid.identity": claims.identity, "braid.reconnect": join.reconnect,
        }):
            refused: set[str] = set()  # nodes that refused this join: full, or unreachable at once
            for attempt in range(MAX_PLACEMENTS):
                try:
                    return await self._try_session(request, claims, token, join, single_pc, refused)
                except _PlaceElsewhere as exc:
                    refused.add(exc.node_id)
                    log.info("media node %s refused %s (%s): placing it elsewhere", exc.node_id, claims.identity,
                             exc.reason)
            raise Reject(503, "no media node could take the participant")

    async def _try_session(self, request: web.Request, claims: Claims, token: str, join: rtc_pb.JoinRequest,
                           single_pc: bool, refused: set[str]):
        room = claims.video.room
        try:
            placement = await self.ctx.call_router(lambda router: router.Place(
                router_pb2.PlaceRequest(room=room, identity=claims.identity, region=self.ctx.config.region,
                                        avoid_node_ids=sorted(refused | set(self.failed_nodes.avoid())),
                                        participant_sid=join.participant_sid if join.reconnect else "",
                                        room_config=room_config_of(claims)),
                timeout=PLACE_TIMEOUT,
                metadata=outgoing_metadata(),
            ))
        except grpc.aio.AioRpcError as exc:
            log.warning("router unreachable for %s: %s", room, exc.code())
            raise Reject(503, "router unavailable") from None
        if placement.HasField("error"):
            status = STATUS.get(placement.error.code, 500)
            raise Reject(status, ROOM_MISSING if status == 404 else placement.error.msg)
        start = media_pb2.SessionStart(
            room=room,
            identity=claims.identity,
            token=token,
            join_request=join.SerializeToString(),
            single_pc=single_pc,
            reconnect=join.reconnect,
            participant_sid=join.participant_sid,
            connection_id=uuid.uuid4().hex,
            signal_node_id=self.ctx.node_id,
            client_ip=request.remote or "",
        )
        call = self.ctx.media(placement.address).Session(metadata=outgoing_metadata())
        try:
            await call.write(media_pb2.SessionUp(start=start))
            first = await asyncio.wait_for(call.read(), FIRST_REPLY_TIMEOUT)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
            call.cancel()
            log.warning("media node %s unreachable: %r", placement.node_id, exc)
            self.failed_nodes.add(placement.node_id)
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise _PlaceElsewhere(placement.node_id, "unreachable") from None
            raise Reject(503, "media node unavailable") from None
        if first is grpc.aio.EOF or first is None:
            call.cancel()
            raise Reject(503, "media node closed the session")
        kind = first.WhichOneof("message")
        if kind == "error":
            call.cancel()
            if first.error.code == NODE_FULL:
                raise _PlaceElsewhere(placement.node_id, first.error.msg)
            raise Reject(STATUS.get(first.error.code, 500), first.error.msg)
        if kind != "response":
            call.cancel()
            raise Reject(500, "unexpected first reply from the media node")
        return call, first.response

    async def _relay(self, ws: web.WebSocketResponse, call, first: bytes) -> None:
        text_mode = [False]
        closing: list[str] = []  # the media node's reason for ending the session, for the WebSocket close

        async def to_client(data: bytes) -> None:
            if text_mode[0]:
                message = rtc_pb.SignalResponse.FromString(data)
                await ws.send_str(json_format.MessageToJson(message, indent=None))
            else:
                await ws.send_bytes(data)

        async def downstream() -> None:
            """Media node → client until either side ends; never raises (its end is read by `_until`)."""
            try:
                while True:
                    down = await call.read()
                    if down is grpc.aio.EOF or down is None:
                        return
                    kind = down.WhichOneof("message")
                    if kind == "response":
                        await to_client(down.response)
                    elif kind == "close":
                        closing.append(down.close.detail or models.DisconnectReason.Name(down.close.reason))
                        return
                    elif kind == "error":
                        closing.append(down.error.msg)
                        return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:  # the media node is gone: rejoin elsewhere
                    log.info("media session broke (%s): telling the client to reconnect", exc.code())
                    try:
                        await to_client(RECONNECT)
                    except Exception:
                        pass
            except (ConnectionResetError, RuntimeError, asyncio.InvalidStateError) as exc:
                log.debug("signal relay to the client ended: %r", exc)  # the WebSocket closed under it

        down_task = asyncio.create_task(downstream(), name="rtc-downstream")
        reason = models.DisconnectReason.SIGNAL_CLOSE
        try:
            await to_client(first)
            async for msg in _until(ws, down_task):
                if msg.type == WSMsgType.BINARY:
                    await call.write(media_pb2.SessionUp(request=msg.data))
                elif msg.type == WSMsgType.TEXT:
                    data = _json_request(msg.data)
                    if data is None:
                        await call.write(media_pb2.SessionUp(request=b"\xff"))  # let the media node refuse it
                    else:
                        text_mode[0] = True
                        await call.write(media_pb2.SessionUp(request=data))
                elif msg.type == WSMsgType.ERROR:
                    error = ws.exception()
                    if getattr(error, "code", None) == WSCloseCode.MESSAGE_TOO_BIG:
                        self.ctx.refusals.count("signal_frame_size")
                    log.info("signal connection error: %r", error)
                    break
        except (grpc.aio.AioRpcError, ConnectionResetError, asyncio.CancelledError,
                asyncio.InvalidStateError) as exc:  # InvalidStateError: the media side already ended the stream
            if isinstance(exc, asyncio.CancelledError):
                reason = models.DisconnectReason.SERVER_SHUTDOWN
            log.debug("signal relay ended: %r", exc)
        except Exception:
            log.exception("signal relay failed")
        finally:
            try:
                await asyncio.wait_for(call.write(media_pb2.SessionUp(end=media_pb2.SessionEnd(reason=reason))), 1.0)
                await asyncio.wait_for(call.done_writing(), 1.0)
            except Exception:
                pass
            if not down_task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(down_task), 1.0)
                except Exception:
                    down_task.cancel()
            call.cancel()
            if not ws.closed:
                message = closing[0].encode()[:120] if closing else b""  # a close reason fits in 123 bytes
                await ws.close(code=WSCloseCode.OK, message=message)


async def _until(ws: web.WebSocketResponse, stop: asyncio.Task):
    """Messages from the client until it closes or `stop` (the media side) finishes."""
    while True:
        receive = asyncio.ensure_future(ws.receive())
        done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
        if receive not in done:
            receive.cancel()
            return
        msg = receive.result()
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return
        yield msg
        if msg.type == WSMsgType.ERROR:
            return


def _json_request(text: str) -> bytes | None:
    try:
        message = json_format.Parse(text, rtc_pb.SignalRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError):
        return None
    return message.SerializeToString()

