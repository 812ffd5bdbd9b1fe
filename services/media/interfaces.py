"""What each layer of the media package sees of the layers that own it.

The node owns rooms, a room owns participants, the cluster plugs into both; the owned side never imports its
owner (tests/test_media_imports.py fails on any import cycle). It is handed the owner and sees it through one
of these Protocols: the few attributes it may use. This module imports nothing from the media package.
"""

from __future__ import annotations

from typing import Any, Protocol

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.shared.auth import KeyProvider
from braid.shared.bus import Bus
from braid.shared.config import Config
from braid.shared.store import NodeInfo, NodeRegistry, RoomStore


class Participant(Protocol):
    """A participant as its tracks, hooks, the drain and the cluster see it."""

    sid: str
    identity: str
    room: Room
    publisher: Any  # publisher.Publisher
    subscriber: Any  # subscriber.Subscriber
    permission: models.ParticipantPermission
    hidden: bool
    closed: bool
    moving: bool
    migrated: bool  # joined here as a move from another node

    def info(self) -> models.ParticipantInfo: ...

    def send(self, response: rtc_pb.SignalResponse) -> None: ...

    def changed(self) -> None: ...

    def published_infos(self) -> list[models.TrackInfo]: ...


class Room(Protocol):
    """A room as its participants, hooks and the cluster see it."""

    name: str
    sid: str
    node: MediaNode
    participants: dict[str, Participant]
    link: RoomLink
    closed: bool
    claim_token: str

    def info(self) -> models.Room: ...

    def by_identity(self, identity: str) -> Participant | None: ...

    def broadcast(self, response: rtc_pb.SignalResponse) -> None: ...

    def schedule_remove(self, p: Participant, reason: int, send_leave: bool) -> None: ...

    async def remove(self, p: Participant, reason: int, send_leave: bool) -> None: ...

    def participant_changed(self, p: Participant) -> None: ...


class RoomLink(Protocol):
    """A room's link to the same room on other media nodes (cluster/events.py), as its remote view sees it."""

    room: Room
    cluster: Cluster
    remote: Any  # cluster.remote.RemoteView
    closed: bool

    def track_subscribed(self, identity: str, track_sid: str) -> None: ...

    def request_snapshot(self) -> None: ...

    def announce_all(self) -> None: ...


class Cluster(Protocol):
    """The media node's part in the cluster, as its room links and relay connections see it."""

    node: MediaNode
    node_id: str
    address: str
    store: RoomStore
    bus: Bus
    channels: Any  # braid.shared.rpc.Channels
    endpoint: Any  # cluster.relay.RelayEndpoint
    sealing_key: bytes
    outbound: set[Any]  # cluster.relay.OutboundLink
    store_ok: bool

    def spawn(self, coro, name: str) -> None: ...

    def origin(self, node_id: str, address: str) -> RelayOrigin: ...

    def local_track(self, room_name: str, track_sid: str) -> Any: ...  # publisher.PublishedTrack | None

    def forget_remote(self, room: Room, rp: Any) -> None: ...


class RelayOrigin(Protocol):
    """The connection to a track's origin node, as the relayed track it feeds sees it (cluster/control.py)."""

    cluster: Cluster
    node_id: str
    address: str
    closed: bool

    def want(self, track: Any) -> None: ...

    def unwant(self, track: Any) -> None: ...

    def demand(self, track: Any) -> None: ...

    def pli(self, ssrc: int) -> None: ...

    def nack(self, ssrc: int, seqs: list[int]) -> None: ...


class MediaNode(Protocol):
    """The media node as its rooms, sessions, admin calls, the drain and the cluster see it."""

    config: Config
    store: RoomStore
    bus: Bus
    registry: NodeRegistry
    notifier: Any  # braid.shared.webhooks notifier
    node_id: str
    grpc_address: str
    keys: KeyProvider
    ports: Any  # ice.PortRange
    hooks: Any  # hooks.Hooks
    refusals: Any  # limits.Refusals
    rooms: dict[str, Room]
    cluster: Cluster
    state: str

    def node_info(self) -> NodeInfo: ...

    async def heartbeat(self) -> None: ...

    async def set_state(self, state: str) -> None: ...

    async def room_for(self, name: str) -> Room: ...

    def room_empty(self, room: Room) -> None: ...

    def drop_room(self, room: Room) -> None: ...
