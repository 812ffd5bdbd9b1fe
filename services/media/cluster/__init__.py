"""A room spanning media nodes: room-wide events over the bus and the node-to-node media relay.

* `manager.Cluster` — the node's part in the cluster (owned by `MediaNode`);
* `events.RoomLink` — one room's events on the bus; `remote.RemoteView` — the participants other nodes host;
* `relayed.RelayedTrack` — a track published elsewhere, as local subscribers receive it;
* `relay` — the UDP/SRTP data plane; `control` — the `Relay.Link` gRPC control stream;
* `load.LoadMeter` — the load a media node heartbeats.
"""

from .manager import Cluster

__all__ = ["Cluster"]
