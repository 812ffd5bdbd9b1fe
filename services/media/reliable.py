"""Reliable data across a resume.

Both directions use `DataPacket.sequence`, which each sending SDK numbers per session (1, 2, ...):
* upstream, the client keeps what it sent and, on resume, resends everything after
  `ReconnectResponse.last_message_seq`; so the node reports the last reliable sequence it relayed from that
  client and drops anything at or below it (a resent copy it already relayed);
* downstream, the client reports in `SyncState.datachannel_receive_states` the last sequence it got from each
  sender; the node keeps the recent reliable packets it sent to the participant (`ReliableLog`) and resends
  the ones after that point.

A sender missing from the receive states delivered nothing that the client still remembers: the SDKs keep a
sender's entry for 30 s after its last packet, so only packets younger than `UNLISTED_WINDOW` (a margin below
that) are resent for it. Packets without a sequence (older SDKs, server-sent data) are never resent: the
client could not tell a copy from a new message.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

MAX_PACKETS = 512
MAX_BYTES = 1 << 20  # per participant: data messages can be 256 KiB each
MAX_AGE = 30.0
UNLISTED_WINDOW = 20.0


@dataclass(frozen=True)
class Sent:
    at: float
    sender_sid: str
    sequence: int
    payload: bytes


class ReliableLog:
    """Recent sequenced reliable packets sent to one participant (bounded in count, bytes and age)."""

    def __init__(self, max_packets: int = MAX_PACKETS, max_age: float = MAX_AGE, max_bytes: int = MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sent: deque[Sent] = deque()
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._sent)

    def record(self, sender_sid: str, sequence: int, payload: bytes) -> None:
        if sequence <= 0 or not sender_sid:
            return
        now = self.clock()
        self._sent.append(Sent(now, sender_sid, sequence, payload))
        self._bytes += len(payload)
        self._trim(now)

    def missing(self, received: dict[str, int]) -> list[bytes]:
        """Payloads the client has not received, given its last sequence per sender, oldest first."""
        now = self.clock()
        self._trim(now)
        out = []
        for sent in self._sent:
            last = received.get(sent.sender_sid)
            if last is None:
                if now - sent.at <= UNLISTED_WINDOW:
                    out.append(sent.payload)
            elif sent.sequence > last:
                out.append(sent.payload)
        return out

    def _trim(self, now: float) -> None:
        sent = self._sent
        while sent and (now - sent[0].at > self.max_age or len(sent) > self.max_packets
                        or self._bytes > self.max_bytes):
            self._bytes -= len(sent.popleft().payload)


class InboundSequence:
    """The last reliable sequence relayed from one client; resent copies at or below it are dropped."""

    def __init__(self) -> None:
        self.last = 0

    def accept(self, sequence: int) -> bool:
        if sequence <= 0:
            return True  # unsequenced: nothing to compare
        if sequence <= self.last:
            return False
        self.last = sequence
        return True


def receive_states(states: Iterable) -> dict[str, int]:
    """`SyncState.datachannel_receive_states` as {publisher sid: last sequence}."""
    return {s.publisher_sid: s.last_seq for s in states if s.publisher_sid}
