"""Braid: a clustered, LiveKit-compatible real-time media server."""

__version__ = "0.1.0"
