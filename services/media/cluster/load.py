"""What a media node reports as its load in its heartbeats: bytes/s through its sockets and its CPU share."""

from __future__ import annotations

import os
import time

from ..interfaces import MediaNode

MIN_WINDOW = 1.0


class LoadMeter:
    def __init__(self) -> None:
        self._at = time.monotonic()
        self._cpu = time.process_time()
        self._bytes = 0
        self.bytes_per_second = 0.0
        self.cpu_load = 0.0  # share of the machine's CPUs this process used (0..1)

    @staticmethod
    def total_bytes(node: MediaNode) -> int:
        total = 0
        for room in list(node.rooms.values()):
            for p in list(room.participants.values()):
                for pc in {p.pub_pc, p.sub_pc} - {None}:
                    total += pc.bytes_in + pc.bytes_out
        endpoint = node.cluster.endpoint
        return total + endpoint.bytes_in + endpoint.bytes_out

    def sample(self, node: MediaNode) -> tuple[float, float]:
        now = time.monotonic()
        elapsed = now - self._at
        if elapsed >= MIN_WINDOW:
            total = self.total_bytes(node)
            cpu = time.process_time()
            # Participants that left take their counters with them: never report a negative rate.
            self.bytes_per_second = max(0.0, (total - self._bytes) / elapsed)
            self.cpu_load = max(0.0, (cpu - self._cpu) / elapsed / (os.cpu_count() or 1))
            self._at, self._bytes, self._cpu = now, total, cpu
        return self.bytes_per_second, self.cpu_load
