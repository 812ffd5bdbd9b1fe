"""Braid: a clustered, LiveKit-compatible real-time media server."""

__version__ = "0.1.0"

# The LiveKit server release whose protocol Braid implements. The SDKs gate features on ServerInfo.version (RPC
# needs >= 1.8.0 in livekit-client and in the Rust core the Python and Node SDKs share, which parses it as semver
# and panics on anything else), so that field carries this; Braid's own version goes in ServerInfo.debug_info.
LIVEKIT_VERSION = "1.9.0"
