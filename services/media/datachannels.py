"""A participant's two data channels, `_reliable` and `_lossy` (one pair per PeerConnection that carries them):
what arrives is held to the participant's size and rate limits before it is decoded; what leaves goes in order,
reliable packets wait (a bounded number) for a channel to open, and a client that stops reading them is reported
instead of buffered for without end."""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

from google.protobuf.message import DecodeError
from livekit.protocol import models

from braid.shared.config import LimitsConfig

from .limits import TokenBucket
from .reliable import InboundSequence, ReliableLog

log = logging.getLogger(__name__)

RELIABLE, LOSSY = "_reliable", "_lossy"
LOSSY_BUFFER_LIMIT = 256 * 1024  # lossy packets are dropped while this much waits in the channel
PENDING_RELIABLE = 256  # reliable packets kept while the data channel is not open yet


class DataChannels:
    """`on_packet(packet, reliable)` gets each decoded packet within the limits; `refuse(limit, why)` counts one
    that was not; `on_slow_reader(buffered)` is told once the client leaves too much reliable data unread."""

    def __init__(self, limits: LimitsConfig, on_packet: Callable[[models.DataPacket, bool], None],
                 refuse: Callable[[str, str], None], on_slow_reader: Callable[[int], None]) -> None:
        self.limits = limits
        self._on_packet = on_packet
        self._refuse = refuse
        self._on_slow_reader = on_slow_reader
        rate = limits.max_data_bytes_per_second
        self.budget = TokenBucket(rate, burst=2 * rate)
        self.by_label: dict[str, list] = {RELIABLE: [], LOSSY: []}
        self.pending_reliable: deque[bytes] = deque(maxlen=PENDING_RELIABLE)
        self.sent_reliable = ReliableLog()  # what a resume may have to send again
        self.received = InboundSequence()  # the last reliable sequence relayed from this client
        self.closed = False

    def add(self, label: str, channel, first: bool = False) -> None:
        """A channel the client opened, or (`first`: preferred for sending) one the server made."""
        channels = self.by_label.get(label)
        if channels is None:
            return
        if first:
            channels.insert(0, channel)
        else:
            channels.append(channel)
        channel.on("message", lambda message, label=label: self.on_message(label, message))
        if label == RELIABLE:
            if channel.readyState == "open":
                self._flush_reliable()
            else:
                channel.on("open", self._flush_reliable)

    def on_message(self, label: str, message) -> None:
        if not isinstance(message, (bytes, bytearray)):
            return
        if self.limits.max_data_packet_size and len(message) > self.limits.max_data_packet_size:
            self._refuse("data_packet_size", f"{len(message)}-byte data packet dropped")
            return
        if not self.budget.take(len(message)):
            self._refuse("data_rate", f"over {self.limits.max_data_bytes_per_second} data bytes/s: packet dropped")
            return
        try:
            packet = models.DataPacket.FromString(bytes(message))
        except DecodeError:
            return
        self._on_packet(packet, label == RELIABLE)

    def send(self, reliable: bool, payload: bytes, sender_sid: str = "", sequence: int = 0) -> bool:
        if reliable:
            self.sent_reliable.record(sender_sid, sequence, payload)
        return self._deliver(reliable, payload)

    def resend_reliable(self, payload: bytes) -> bool:
        """Send again a reliable packet the client reported missing after a resume."""
        if any(item is payload for item in self.pending_reliable):
            return False  # still waiting for the channel: it goes out anyway
        return self._deliver(True, payload)

    def _deliver(self, reliable: bool, payload: bytes) -> bool:
        if reliable and self.pending_reliable:
            self.pending_reliable.append(payload)  # keep the order behind what is waiting
            self._flush_reliable()
            return True
        if self._send_on(RELIABLE if reliable else LOSSY, payload):
            return True
        if reliable and not self.closed:
            self.pending_reliable.append(payload)
            return True
        return False

    def _flush_reliable(self) -> None:
        while self.pending_reliable:
            if not self._send_on(RELIABLE, self.pending_reliable[0]):
                return
            self.pending_reliable.popleft()

    def _send_on(self, label: str, payload: bytes) -> bool:
        for channel in self.by_label[label]:
            if channel.readyState != "open":
                continue
            if label == LOSSY and channel.bufferedAmount > LOSSY_BUFFER_LIMIT:
                return False
            if label == RELIABLE and self.limits.max_data_buffered \
                    and channel.bufferedAmount > self.limits.max_data_buffered:
                self._on_slow_reader(channel.bufferedAmount)
                return True  # it is being disconnected: nothing more is kept for it
            try:
                channel.send(payload)
            except Exception:  # closed underneath us
                continue
            return True
        return False
