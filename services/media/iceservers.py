"""The ICE servers a participant is told about (JoinResponse / ReconnectResponse `ice_servers`).

STUN URLs as configured; TURN servers either with static credentials, passed through as configured, or with
time-limited credentials minted per participant by the TURN REST scheme that coturn's `use-auth-secret`
verifies: username `<expiry unix time>:<identity>`, password base64(HMAC-SHA1(shared secret, username)).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from livekit.protocol import rtc as rtc_pb

from braid.shared.config import RTCConfig, TurnConfig


def rest_credentials(secret: str, identity: str, ttl: float, now: float | None = None) -> tuple[str, str]:
    """(username, password) valid for `ttl` seconds from `now`, for a TURN server sharing `secret`."""
    expiry = int((time.time() if now is None else now) + ttl)
    username = f"{expiry}:{identity}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(rtc: RTCConfig, turn: TurnConfig, identity: str, now: float | None = None) -> list[rtc_pb.ICEServer]:
    servers: list[rtc_pb.ICEServer] = []
    if rtc.stun_servers:
        servers.append(rtc_pb.ICEServer(urls=list(rtc.stun_servers)))
    if turn.urls:
        if turn.secret:
            username, credential = rest_credentials(turn.secret, identity, turn.ttl, now)
        else:
            username, credential = turn.username, turn.credential
        servers.append(rtc_pb.ICEServer(urls=list(turn.urls), username=username, credential=credential))
    for extra in turn.servers:
        urls = extra["urls"]
        servers.append(rtc_pb.ICEServer(urls=[urls] if isinstance(urls, str) else list(urls),
                                        username=str(extra.get("username", "")),
                                        credential=str(extra.get("credential", ""))))
    return servers
