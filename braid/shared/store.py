"""The state every service shares: rooms, their participants, and which media nodes host them.

`RoomStore` is the one interface; `MemoryStore` backs the single-process dev mode and the Redis
store backs a cluster. Values are livekit protobuf messages (`Room`, `ParticipantInfo`).
"""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, field
from typing import Sequence

from livekit.protocol import models

from braid.shared import ids


@dataclass
class NodeInfo:
    """A node as the registry knows it. Heartbeats refresh `updated_at`; stale entries are ignored."""

    node_id: str
    role: str  # "media" | "signal" | "router"
    address: str  # gRPC host:port
    region: str = ""
    state: str = "SERVING"  # or "DRAINING"
    participants: int = 0
    tracks: int = 0
    bytes_per_second: float = 0.0
    max_participants: int = 0
    max_tracks: int = 0
    max_bytes_per_second: float = 0.0
    cpu_load: float = 0.0
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def over_limit(self) -> str | None:
        """The first hard limit the node has reached, or None (the router and the node itself check it)."""
        if self.max_participants and self.participants >= self.max_participants:
            return f"participants {self.participants}/{self.max_participants}"
        if self.max_tracks and self.tracks >= self.max_tracks:
            return f"tracks {self.tracks}/{self.max_tracks}"
        if self.max_bytes_per_second and self.bytes_per_second >= self.max_bytes_per_second:
            return f"bytes/s {self.bytes_per_second:.0f}/{self.max_bytes_per_second:.0f}"
        return None


class RoomStore(abc.ABC):
    """Rooms and their participants. All methods are safe to call from any node."""

    @abc.abstractmethod
    async def create_room(self, room: models.Room) -> tuple[models.Room, bool]:
        """Store `room` unless one with its name exists; returns the stored room and whether it was new."""

    @abc.abstractmethod
    async def get_room(self, name: str) -> models.Room | None: ...

    @abc.abstractmethod
    async def list_rooms(self, names: list[str] | None = None) -> list[models.Room]: ...

    @abc.abstractmethod
    async def update_room(self, room: models.Room) -> bool:
        """Replace a stored room; False if it no longer exists (it is not recreated)."""

    @abc.abstractmethod
    async def delete_room(self, name: str) -> bool:
        """Remove the room, its participants and its node assignments; False if it was absent."""

    # Participant records are kept per session (sid): a rejoin adds its own record and never overwrites the one
    # of the session it replaces, so whoever ends the old session still finds and removes exactly that record
    # (and sends its webhook). Reads by identity see the newest session, as LiveKit shows one per identity.

    @abc.abstractmethod
    async def put_participant(self, room: str, info: models.ParticipantInfo) -> None:
        """Store (or update) the record of session `info.sid`; other sessions' records are untouched."""

    @abc.abstractmethod
    async def delete_participant(self, room: str, identity: str, sid: str) -> bool:
        """Remove the record of session `sid` (exact match); False if it was absent."""

    @abc.abstractmethod
    async def list_sessions(self, room: str) -> list[models.ParticipantInfo]:
        """Every stored session record, superseded ones included, oldest join first."""

    async def get_participant(self, room: str, identity: str) -> models.ParticipantInfo | None:
        """The newest session of `identity`."""
        sessions = [p for p in await self.list_sessions(room) if p.identity == identity]
        return sessions[-1] if sessions else None

    async def list_participants(self, room: str) -> list[models.ParticipantInfo]:
        """One record per identity (its newest session), oldest join first."""
        return newest_per_identity(await self.list_sessions(room))

    @abc.abstractmethod
    async def room_nodes(self, room: str) -> dict[str, str]:
        """Media nodes hosting the room: node id → owner token of its claim."""

    @abc.abstractmethod
    async def claim_room_node(self, room: str, node_id: str, token: str, if_absent: bool = False) -> bool:
        """Record that `node_id` hosts `room`, owned by `token` (replacing the entry, or only if there is none);
        True if the entry is now `token`."""

    @abc.abstractmethod
    async def release_room_node(self, room: str, node_id: str, token: str) -> bool:
        """Atomically remove the claim only if it is still owned by `token`: a newer claim is kept."""

    @abc.abstractmethod
    async def mark_moved(self, room: str, identity: str, sid: str, ttl: float,
                         tracks: Sequence[models.TrackInfo] = ()) -> None:
        """A draining node is moving this participant: its rejoin elsewhere is a migration (keeps `sid`, and its
        tracks, republished, keep theirs)."""

    @abc.abstractmethod
    async def take_moved(self, room: str, identity: str) -> models.ParticipantInfo | None:
        """The sid and tracks of a participant being moved here (once), or None for an ordinary join."""

    async def try_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lease `name` for `owner` unless another owner holds it (one process at a time does a
        cluster-wide job, e.g. the router's room reaper). In-memory: one process, always granted."""
        return True

    async def close(self) -> None:
        return None


class NodeRegistry(abc.ABC):
    """Live nodes of the cluster, each kept alive by heartbeats within `ttl` seconds."""

    @abc.abstractmethod
    async def heartbeat(self, node: NodeInfo, ttl: float) -> None: ...

    @abc.abstractmethod
    async def remove(self, node_id: str) -> None: ...

    @abc.abstractmethod
    async def nodes(self, role: str | None = None) -> list[NodeInfo]:
        """Nodes whose last heartbeat is younger than their TTL."""

    async def get(self, node_id: str) -> NodeInfo | None:
        for node in await self.nodes():
            if node.node_id == node_id:
                return node
        return None

    async def close(self) -> None:
        return None


PLACEMENT_CLAIM = "placed:"


def node_claim_token() -> str:
    """The owner token of a media node's claim on a room it hosts (one per hosting, so a late release of an
    earlier hosting cannot remove a newer claim)."""
    return ids.guid("CL_")


def placement_claim_token(now: float) -> str:
    """A router's claim for the node it just placed a participant on, before that node hosts the room; it carries
    its time so a claim never followed by a join can be aged out (the node's own claim replaces it)."""
    return f"{PLACEMENT_CLAIM}{int(now * 1000)}:{ids.guid('', 6)}"


def placement_claim_age(token: str, now: float) -> float | None:
    """Seconds since a placement claim was made, or None for a node's own claim."""
    if not token.startswith(PLACEMENT_CLAIM):
        return None
    try:
        return now - int(token[len(PLACEMENT_CLAIM):].split(":", 1)[0]) / 1000
    except ValueError:
        return None


def session_order(info: models.ParticipantInfo) -> tuple[int, str]:
    return (info.joined_at_ms or info.joined_at * 1000, info.sid)


def newest_per_identity(sessions: list[models.ParticipantInfo]) -> list[models.ParticipantInfo]:
    """The newest session of each identity, ordered by join time."""
    newest: dict[str, models.ParticipantInfo] = {}
    for info in sorted(sessions, key=session_order):
        newest[info.identity] = info
    return sorted(newest.values(), key=session_order)


def _copy(msg):
    clone = type(msg)()
    clone.CopyFrom(msg)
    return clone


class MemoryStore(RoomStore):
    """In-process store for the dev mode: one process, no Redis."""

    def __init__(self) -> None:
        self._rooms: dict[str, models.Room] = {}
        self._participants: dict[str, dict[str, models.ParticipantInfo]] = {}  # room → sid → record
        self._nodes: dict[str, dict[str, str]] = {}
        self._moved: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = asyncio.Lock()

    async def create_room(self, room: models.Room) -> tuple[models.Room, bool]:
        async with self._lock:
            existing = self._rooms.get(room.name)
            if existing is not None:
                return _copy(existing), False
            self._rooms[room.name] = _copy(room)
            return _copy(room), True

    async def get_room(self, name: str) -> models.Room | None:
        room = self._rooms.get(name)
        return None if room is None else self._with_counts(room)

    async def list_rooms(self, names: list[str] | None = None) -> list[models.Room]:
        wanted = set(names or ())
        return [
            self._with_counts(room)
            for name, room in sorted(self._rooms.items(), key=lambda kv: kv[1].creation_time_ms)
            if not wanted or name in wanted
        ]

    def _with_counts(self, room: models.Room) -> models.Room:
        clone = _copy(room)
        people = newest_per_identity(list(self._participants.get(room.name, {}).values()))
        clone.num_participants = sum(1 for p in people if not p.permission.hidden)
        clone.num_publishers = sum(1 for p in people if p.is_publisher)
        return clone

    async def update_room(self, room: models.Room) -> bool:
        async with self._lock:
            if room.name not in self._rooms:
                return False
            self._rooms[room.name] = _copy(room)
            return True

    async def delete_room(self, name: str) -> bool:
        async with self._lock:
            self._participants.pop(name, None)
            self._nodes.pop(name, None)
            return self._rooms.pop(name, None) is not None

    async def put_participant(self, room: str, info: models.ParticipantInfo) -> None:
        self._participants.setdefault(room, {})[info.sid] = _copy(info)

    async def delete_participant(self, room: str, identity: str, sid: str) -> bool:
        if not sid:
            raise ValueError("delete_participant needs the sid of the session to remove")
        return self._participants.get(room, {}).pop(sid, None) is not None

    async def list_sessions(self, room: str) -> list[models.ParticipantInfo]:
        people = self._participants.get(room, {}).values()
        return sorted((_copy(p) for p in people), key=session_order)

    async def room_nodes(self, room: str) -> dict[str, str]:
        return dict(self._nodes.get(room, {}))

    async def claim_room_node(self, room: str, node_id: str, token: str, if_absent: bool = False) -> bool:
        claims = self._nodes.setdefault(room, {})
        if if_absent:
            claims.setdefault(node_id, token)
        else:
            claims[node_id] = token
        return claims[node_id] == token

    async def release_room_node(self, room: str, node_id: str, token: str) -> bool:
        claims = self._nodes.get(room, {})
        if claims.get(node_id) != token:
            return False
        del claims[node_id]
        return True

    async def mark_moved(self, room: str, identity: str, sid: str, ttl: float,
                         tracks: Sequence[models.TrackInfo] = ()) -> None:
        self._moved[(room, identity)] = (models.ParticipantInfo(sid=sid, tracks=tracks), time.monotonic() + ttl)

    async def take_moved(self, room: str, identity: str) -> models.ParticipantInfo | None:
        moved, expires = self._moved.pop((room, identity), (None, 0.0))
        return moved if moved is not None and expires > time.monotonic() else None


class MemoryRegistry(NodeRegistry):
    def __init__(self) -> None:
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}

    async def heartbeat(self, node: NodeInfo, ttl: float) -> None:
        node.updated_at = time.time()
        self._nodes[node.node_id] = (node, node.updated_at + ttl)

    async def remove(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    async def nodes(self, role: str | None = None) -> list[NodeInfo]:
        now = time.time()
        return [
            node
            for node, expires in self._nodes.values()
            if expires > now and (role is None or node.role == role)
        ]
