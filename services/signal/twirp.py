"""`POST /twirp/livekit.RoomService/<Method>`: LiveKit's server API, protobuf or JSON, Twirp errors.

The edge authenticates and checks grants; the router does the work (`Router.Administer`).
"""

from __future__ import annotations

import json
import logging

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from braid.rpc import common_pb2
from braid.shared.auth import AuthError, bearer_token, verify_token
from braid.shared.roomservice import SERVICES, permission_error
from braid.services.router.service import administer

log = logging.getLogger(__name__)

PREFIX = "/twirp/livekit."
MAX_BODY = 1024 * 1024

# Twirp error code → HTTP status (twitchtv/twirp errors.go).
STATUS = {
    "canceled": 408, "invalid_argument": 400, "malformed": 400, "deadline_exceeded": 408,
    "not_found": 404, "bad_route": 404, "already_exists": 409, "permission_denied": 403,
    "unauthenticated": 401, "resource_exhausted": 429, "failed_precondition": 412, "aborted": 409,
    "out_of_range": 400, "unimplemented": 501, "internal": 500, "unavailable": 503, "dataloss": 500,
    "unknown": 500,
}
PROTOBUF = "application/protobuf"
JSON = "application/json"


def twirp_error(code: str, msg: str, status: int | None = None, **meta: str) -> web.Response:
    body = {"code": code, "msg": msg, "meta": {k: str(v) for k, v in meta.items()}}
    return web.json_response(body, status=status or STATUS.get(code, 500))


def _content_type(request: web.Request) -> str:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _decode(kind: str, body: bytes, message_type: type[Message]) -> Message:
    if kind == PROTOBUF:
        return message_type.FromString(body)
    message = message_type()
    json_format.Parse(body.decode("utf-8") or "{}", message, ignore_unknown_fields=True)
    return message


def _encode(kind: str, message: Message) -> web.Response:
    if kind == PROTOBUF:
        return web.Response(body=message.SerializeToString(), content_type=PROTOBUF)
    text = json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=None
    )
    return web.Response(text=text, content_type=JSON)


def add_twirp_routes(app: web.Application, ctx) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        name = request.match_info["method"]
        method = SERVICES.get(request.match_info["service"], {}).get(name)
        if method is None:
            return twirp_error("bad_route", f"no handler for path {request.path!r}", twirp_invalid_route=f"POST {request.path}")
        kind = _content_type(request)
        if kind not in (PROTOBUF, JSON):
            return twirp_error("bad_route", f"unexpected Content-Type: {kind or 'none'!r}")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return twirp_error("malformed", f"request body exceeds {MAX_BODY} bytes", status=413)
        try:
            body = await request.content.read(MAX_BODY + 1)
        except Exception:
            return twirp_error("malformed", "failed to read request body")
        if len(body) > MAX_BODY:
            return twirp_error("malformed", f"request body exceeds {MAX_BODY} bytes", status=413)
        try:
            claims = verify_token(
                bearer_token(request.headers.get("Authorization"), None), ctx.keys
            )
        except AuthError as exc:
            log.info("twirp %s refused from %s: %s", name, request.remote, exc)
            return twirp_error("unauthenticated", str(exc))
        try:
            message = _decode(kind, body, method.request)
        except (DecodeError, json_format.ParseError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            what = "protobuf" if kind == PROTOBUF else "JSON"
            return twirp_error("malformed", f"the request could not be decoded as {what}: {exc}".strip())
        denied = permission_error(method, claims, message)
        if denied:
            log.info("twirp %s refused for %s (key %s): %s", name, claims.identity or "-", claims.api_key, denied)
            return twirp_error("permission_denied", denied)
        if not method.implemented:
            return twirp_error("unimplemented", f"{name} is not supported by this server yet")
        call = common_pb2.RoomCall(method=name, room=method.room_of(message), request=message.SerializeToString())
        try:
            reply = await ctx.call_router(lambda router: administer(router, call))
        except grpc.aio.AioRpcError as exc:
            log.warning("router unavailable for %s: %s", name, exc.code())
            return twirp_error("unavailable", "the room service is unavailable, try again")
        if reply.HasField("error"):
            return twirp_error(reply.error.code, reply.error.msg)
        return _encode(kind, method.response.FromString(reply.response))

    app.router.add_post(PREFIX + "{service}/{method}", handle)
