"""Choosing the media node for a participant.

Hard limits (participants, tracks, bytes/s) and the node state filter the candidates first; a
strategy then picks among them. Every decision carries its reason, which the router logs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from braid.shared.store import NodeInfo

STRATEGIES = ("any", "least_load", "region_aware", "power_of_two")


@dataclass(frozen=True)
class Region:
    name: str
    lat: float
    lon: float


@dataclass
class Choice:
    node: NodeInfo | None
    reason: str


def load(node: NodeInfo) -> tuple[float, float, int]:
    """Lower is better: fraction of the tightest limit used, then CPU, then participants."""
    fractions = [
        used / limit
        for used, limit in (
            (node.participants, node.max_participants),
            (node.tracks, node.max_tracks),
            (node.bytes_per_second, node.max_bytes_per_second),
        )
        if limit
    ]
    return (max(fractions, default=0.0), node.cpu_load, node.participants)


def distance_km(a: Region, b: Region) -> float:
    """Great-circle distance (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a.lat, a.lon, b.lat, b.lon))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 6371.0 * 2 * math.asin(math.sqrt(h))


class NodeSelector:
    def __init__(
        self,
        strategy: str = "least_load",
        regions: Sequence[Region] = (),
        rng: Callable[[Sequence[NodeInfo]], NodeInfo] | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown node selection strategy {strategy!r}")
        self.strategy = strategy
        self.regions = {r.name: r for r in regions}
        self._pick = rng or random.choice

    def choose(
        self, candidates: list[NodeInfo], hosting: set[str] = frozenset(), prefer: str = "", region: str = "",
        avoid: set[str] = frozenset(),
    ) -> Choice:
        # `avoid`: nodes the caller just failed to reach (a killed node stays registered until its TTL expires).
        serving = [n for n in candidates if n.state == "SERVING" and n.node_id not in avoid]
        if not serving:
            return Choice(None, "no serving media node" + (" (all draining)" if candidates else ""))
        by_id = {n.node_id: n for n in serving}
        if prefer in by_id:
            return Choice(by_id[prefer], f"resume stays on {prefer}")
        usable = [n for n in serving if n.over_limit() is None]
        if not usable:
            limits = "; ".join(f"{n.node_id}: {n.over_limit()}" for n in serving)
            return Choice(None, f"every media node is at a hard limit ({limits})")
        if region:
            in_region = [n for n in usable if n.region == region]
            if in_region:
                usable, where = in_region, f" in region {region}"
            elif self.strategy == "region_aware" and region in self.regions:
                usable, where = self._nearest_region(usable, self.regions[region])
            else:
                where = ""
        else:
            where = ""
        # Keep the room together on a node that already hosts it, when that node is in the chosen set.
        hosting_nodes = [n for n in usable if n.node_id in hosting]
        if hosting_nodes:
            node = min(hosting_nodes, key=load)
            return Choice(node, f"already hosts the room{where}")
        return self._by_strategy(usable, where)

    def _nearest_region(self, nodes: list[NodeInfo], origin: Region) -> tuple[list[NodeInfo], str]:
        located = [(distance_km(origin, self.regions[n.region]), n) for n in nodes if n.region in self.regions]
        if not located:
            return nodes, ""
        nearest = min(d for d, _ in located)
        closest = [n for d, n in located if d == nearest]
        return closest, f" in nearest region {closest[0].region} ({nearest:.0f} km from {origin.name})"

    def _by_strategy(self, nodes: list[NodeInfo], where: str) -> Choice:
        if self.strategy == "any":
            return Choice(self._pick(nodes), f"any serving node{where}")
        if self.strategy == "power_of_two" and len(nodes) > 2:
            first = self._pick(nodes)
            second = self._pick([n for n in nodes if n is not first])
            node = min((first, second), key=load)
            return Choice(node, f"less loaded of two random nodes{where}")
        return Choice(min(nodes, key=load), f"least loaded{where}")
