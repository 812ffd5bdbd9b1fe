"""What the signal edge does when a media node fails under it.

* A node that refused or broke a session is avoided in placements for `AVOID_FOR` seconds: a killed node stays in
  the registry until its heartbeat TTL expires, and the router would otherwise keep choosing it.
* A participant whose media node broke its session mid-call is told to reconnect (`leave` with action RECONNECT):
  the SDK rejoins from scratch through an edge and lands on a live node.
"""

from __future__ import annotations

import time

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

AVOID_FOR = 15.0

RECONNECT = rtc_pb.SignalResponse(leave=rtc_pb.LeaveRequest(
    can_reconnect=True, reason=models.DisconnectReason.MIGRATION, action=rtc_pb.LeaveRequest.RECONNECT,
)).SerializeToString()


class FailedNodes:
    def __init__(self, avoid_for: float = AVOID_FOR):
        self.avoid_for = avoid_for
        self._until: dict[str, float] = {}

    def add(self, node_id: str) -> None:
        if node_id:
            self._until[node_id] = time.monotonic() + self.avoid_for

    def avoid(self) -> list[str]:
        now = time.monotonic()
        for node_id in [n for n, until in self._until.items() if until <= now]:
            del self._until[node_id]
        return list(self._until)
