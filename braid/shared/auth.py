"""Access tokens exactly as LiveKit's server SDKs mint them (HS256 JWT, camelCase `video` grants).

Verification is shared by the Twirp API and the signal endpoints; minting is used by the CLI, by
`refresh_token` pushes and by webhook signatures.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import warnings

import jwt
from jwt.warnings import InsecureKeyLengthWarning

# LiveKit's dev secret is the 6-byte "secret"; the SDKs accept it, so Braid does not warn on every token.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

LEEWAY_SECONDS = 60

# camelCase grant keys of the `video` claim, as livekit-api and the Go SDK write them.
VIDEO_GRANT_KEYS = (
    "roomCreate", "roomList", "roomRecord", "roomAdmin", "roomJoin", "room", "destinationRoom",
    "canPublish", "canSubscribe", "canPublishData", "canPublishSources", "canUpdateOwnMetadata",
    "ingressAdmin", "hidden", "recorder", "agent", "canManageAgentSession", "canSubscribeMetrics",
)


class AuthError(Exception):
    """A token that cannot be trusted. `status` is the HTTP status to answer with."""

    def __init__(self, msg: str, status: int = 401, code: str = "unauthenticated"):
        super().__init__(msg)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class VideoGrant:
    room_create: bool = False
    room_list: bool = False
    room_record: bool = False
    room_admin: bool = False
    room_join: bool = False
    room: str = ""
    destination_room: str = ""
    # LiveKit treats absent publish/subscribe grants as allowed.
    can_publish: bool = True
    can_subscribe: bool = True
    can_publish_data: bool = True
    can_publish_sources: tuple[str, ...] = ()
    can_update_own_metadata: bool = False
    ingress_admin: bool = False
    hidden: bool = False
    recorder: bool = False
    agent: bool = False

    @classmethod
    def from_claim(cls, video: Mapping[str, Any] | None) -> "VideoGrant":
        v = video or {}

        def flag(key: str, default: bool = False) -> bool:
            value = v.get(key)
            return default if value is None else bool(value)

        return cls(
            room_create=flag("roomCreate"),
            room_list=flag("roomList"),
            room_record=flag("roomRecord"),
            room_admin=flag("roomAdmin"),
            room_join=flag("roomJoin"),
            room=str(v.get("room") or ""),
            destination_room=str(v.get("destinationRoom") or ""),
            can_publish=flag("canPublish", True),
            can_subscribe=flag("canSubscribe", True),
            can_publish_data=flag("canPublishData", True),
            can_publish_sources=tuple(v.get("canPublishSources") or ()),
            can_update_own_metadata=flag("canUpdateOwnMetadata"),
            ingress_admin=flag("ingressAdmin"),
            hidden=flag("hidden"),
            recorder=flag("recorder"),
            agent=flag("agent"),
        )


@dataclass(frozen=True)
class Claims:
    """The verified content of an access token."""

    api_key: str
    identity: str
    video: VideoGrant
    name: str = ""
    metadata: str = ""
    kind: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    sha256: str = ""
    expires_at: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> "Claims":
        attrs = payload.get("attributes") or {}
        if not isinstance(attrs, Mapping):
            raise AuthError("invalid token: attributes must be an object")
        video = payload.get("video")
        if video is not None and not isinstance(video, Mapping):
            raise AuthError("invalid token: video grant must be an object")
        return cls(
            api_key=str(payload.get("iss", "")),
            identity=str(payload.get("sub", "")),
            video=VideoGrant.from_claim(video),
            name=str(payload.get("name", "") or ""),
            metadata=str(payload.get("metadata", "") or ""),
            kind=str(payload.get("kind", "") or ""),
            attributes={str(k): str(v) for k, v in attrs.items()},
            sha256=str(payload.get("sha256", "") or ""),
            expires_at=int(payload.get("exp", 0) or 0),
            raw=dict(payload),
        )


class KeyProvider:
    """API key → secret pairs; several may be valid at once (key rotation)."""

    def __init__(self, keys: Mapping[str, str]):
        self._keys = dict(keys)

    def secret(self, api_key: str) -> str | None:
        return self._keys.get(api_key)

    def __contains__(self, api_key: str) -> bool:
        return api_key in self._keys

    def first(self) -> tuple[str, str]:
        return next(iter(self._keys.items()))


def verify_token(token: str, keys: KeyProvider) -> Claims:
    """Check signature, issuer and time window; returns the claims or raises AuthError."""
    if not token:
        raise AuthError("authorization required")
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    if header.get("alg") != "HS256":
        raise AuthError("invalid token: algorithm must be HS256")
    api_key = unverified.get("iss")
    if not isinstance(api_key, str) or not api_key:
        raise AuthError("invalid token: missing issuer (API key)")
    secret = keys.secret(api_key)
    if secret is None:
        raise AuthError(f"invalid API key: {api_key}")
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp"], "verify_aud": False},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("invalid token: token is expired") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("invalid token: token is not valid yet") from None
    except jwt.InvalidSignatureError:
        raise AuthError("invalid token: signature is invalid") from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    return Claims.from_payload(payload)


def verify_join_token(token: str, keys: KeyProvider, room: str | None = None, identity: str | None = None) -> Claims:
    """A token that may join: verified, with roomJoin, a room and an identity (equal to `room`/`identity` if given)."""
    claims = verify_token(token, keys)
    if not claims.video.room_join:
        raise AuthError("permission denied: token has no roomJoin grant")
    if not claims.video.room:
        raise AuthError("permission denied: token names no room")
    if not claims.identity:
        raise AuthError("permission denied: token has no identity")
    if room is not None and claims.video.room != room:
        raise AuthError("permission denied: token is for another room")
    if identity is not None and claims.identity != identity:
        raise AuthError("permission denied: token is for another identity")
    return claims


def verify_admin_token(token: str, keys: KeyProvider) -> Claims:
    """A node operator's token: roomAdmin over every room (no `room` restriction), as no join token has."""
    claims = verify_token(token, keys)
    if not claims.video.room_admin or claims.video.room:
        raise AuthError("permission denied: needs a roomAdmin grant not limited to one room", status=403,
                        code="permission_denied")
    return claims


def bearer_token(authorization: str | None, query_token: str | None) -> str:
    """The token from `Authorization: Bearer …` first, else from the `access_token` parameter."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return (query_token or "").strip()


def mint_token(
    api_key: str,
    api_secret: str,
    *,
    identity: str = "",
    ttl_seconds: int = 6 * 3600,
    video: Mapping[str, Any] | None = None,
    name: str = "",
    metadata: str = "",
    attributes: Mapping[str, str] | None = None,
    kind: str = "",
    sha256: str = "",
    expires_at: int | None = None,
    issued_at: bool = False,
) -> str:
    """A token in the same shape livekit-api's AccessToken produces (empty claims are left out)."""
    now = int(time.time())
    payload: dict[str, Any] = {}
    for key, value in (("name", name), ("kind", kind), ("metadata", metadata), ("sha256", sha256)):
        if value:
            payload[key] = value
    if video:
        payload["video"] = dict(video)
    if attributes:
        payload["attributes"] = dict(attributes)
    payload["sub"] = identity
    payload["iss"] = api_key
    payload["nbf"] = now
    if issued_at:
        payload["iat"] = now
    payload["exp"] = expires_at if expires_at is not None else now + ttl_seconds
    return jwt.encode(payload, api_secret, algorithm="HS256")


def refreshed_token(claims: Claims, api_secret: str, min_valid_seconds: int = 600) -> str:
    """Re-sign a participant's claims, keeping its expiry unless that is sooner than `min_valid_seconds`."""
    now = int(time.time())
    payload = dict(claims.raw)
    payload["nbf"] = now
    payload["exp"] = max(int(payload.get("exp", 0) or 0), now + min_valid_seconds)
    return jwt.encode(payload, api_secret, algorithm="HS256")


def body_sha256(body: bytes) -> str:
    """Base64 (standard alphabet) SHA-256, as LiveKit puts it in a webhook token's `sha256` claim."""
    return base64.b64encode(hashlib.sha256(body).digest()).decode()
