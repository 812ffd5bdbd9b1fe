"""What a signal edge needs to serve clients: config, keys, and stubs to the router and media nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from braid.shared.auth import KeyProvider
from braid.shared.config import Config
from braid.shared.rpc import Channels


@dataclass
class SignalContext:
    config: Config
    keys: KeyProvider
    channels: Channels
    node_id: str
    # Whether the node can take joins now (started, not draining, backends reachable).
    ready: Callable[[], bool] = field(default=lambda: True)

    @property
    def router(self):
        return self.channels.router(self.config.router_address)

    def media(self, address: str):
        return self.channels.media(address)
