"""Agent workers on the signal edge: the `/agent` WebSocket (see hub.py) and one worker's connection (worker.py)."""

from .hub import AgentHub, add_agent_routes

__all__ = ["AgentHub", "add_agent_routes"]
