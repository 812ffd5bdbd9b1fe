"""LiveKit-style identifiers. The SDKs check the prefixes (`RM_`, `PA_`, `TR_`), so keep them exact."""

import hashlib
import secrets
import string

_ALPHABET = string.ascii_letters + string.digits

ROOM_PREFIX = "RM_"
PARTICIPANT_PREFIX = "PA_"
TRACK_PREFIX = "TR_"
EVENT_PREFIX = "EV_"
NODE_PREFIX = "ND_"


def guid(prefix: str, length: int = 12) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def room_sid() -> str:
    return guid(ROOM_PREFIX)


def participant_sid() -> str:
    return guid(PARTICIPANT_PREFIX)


def track_sid() -> str:
    return guid(TRACK_PREFIX)


def event_id() -> str:
    return guid(EVENT_PREFIX)


def node_id() -> str:
    return guid(NODE_PREFIX)


# livekit/protocol guid prefixes of the agent service
AGENT_WORKER_PREFIX = "AW_"
AGENT_JOB_PREFIX = "AJ_"
AGENT_DISPATCH_PREFIX = "AD_"


def agent_worker_id() -> str:
    return guid(AGENT_WORKER_PREFIX)


def agent_job_id() -> str:
    return guid(AGENT_JOB_PREFIX)


def agent_dispatch_id() -> str:
    return guid(AGENT_DISPATCH_PREFIX)


def stable_id(prefix: str, *parts: str, length: int = 12) -> str:
    """An id derived from `parts`: every process computing it for the same thing gets the same one."""
    digest = int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest(), "big")
    chars = []
    for _ in range(length):
        digest, index = divmod(digest, len(_ALPHABET))
        chars.append(_ALPHABET[index])
    return prefix + "".join(chars)
