"""The ServerInfo every client and agent worker is told: which LiveKit release Braid speaks, and which node."""

from __future__ import annotations

from livekit.protocol import models

from braid import LIVEKIT_VERSION, __version__

PROTOCOL_VERSION = 16  # livekit signal protocol
AGENT_PROTOCOL_VERSION = 1  # livekit_agent.proto worker protocol
# Codecs the media service forwards, a room's default `enabled_codecs`: the SDKs publish only these (livekit-client
# falls back to VP8 for a camera asked to publish anything else).
ENABLED_CODECS = ("audio/opus", "audio/red", "video/VP8", "video/H264", "video/VP9", "video/AV1")


def server_info(region: str, node_id: str) -> models.ServerInfo:
    return models.ServerInfo(
        edition=models.ServerInfo.Standard,
        version=LIVEKIT_VERSION,
        protocol=PROTOCOL_VERSION,
        agent_protocol=AGENT_PROTOCOL_VERSION,
        region=region,
        node_id=node_id,
        debug_info=f"braid {__version__}",
    )
