"""Choosing the media node for a participant."""

from __future__ import annotations

from dataclasses import dataclass

from braid.shared.store import NodeInfo


@dataclass
class Choice:
    node: NodeInfo | None
    reason: str


def has_capacity(node: NodeInfo) -> bool:
    if node.max_participants and node.participants >= node.max_participants:
        return False
    if node.max_tracks and node.tracks >= node.max_tracks:
        return False
    if node.max_bytes_per_second and node.bytes_per_second >= node.max_bytes_per_second:
        return False
    return True


def choose_node(
    candidates: list[NodeInfo], hosting: set[str], prefer: str = "", region: str = ""
) -> Choice:
    """Keep a resumed participant where it was, else join the room's node, else the least loaded."""
    serving = [n for n in candidates if n.state == "SERVING"]
    if not serving:
        return Choice(None, "no serving media node")
    by_id = {n.node_id: n for n in serving}
    if prefer in by_id:
        return Choice(by_id[prefer], f"resume stays on {prefer}")
    usable = [n for n in serving if has_capacity(n)]
    if not usable:
        return Choice(None, "every media node is at its limits")
    for node in sorted(usable, key=lambda n: n.participants):
        if node.node_id in hosting:
            return Choice(node, "node already hosts the room")
    in_region = [n for n in usable if region and n.region == region]
    pool = in_region or usable
    node = min(pool, key=lambda n: (n.participants, n.cpu_load))
    why = "least loaded in region " + region if in_region else "least loaded"
    return Choice(node, why)
