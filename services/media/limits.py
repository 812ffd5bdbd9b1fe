"""Bounds on what one client controls, and the count of every refusal (served by `/metrics`).

The figures live in `LimitsConfig` (braid/shared/config.py); this module holds the checks shared by the signal
handlers and RoomService and a token bucket for data rates; refusals are counted by `Refusals` (health.py).
"""

from __future__ import annotations

import time
from typing import Mapping

from braid.shared.config import LimitsConfig


def attributes_size(attributes: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in attributes.items())


def merged_attributes(current: Mapping[str, str], update: Mapping[str, str]) -> dict[str, str]:
    """`update` applied to `current` by LiveKit's rule: an empty value deletes its key."""
    merged = dict(current)
    for key, value in update.items():
        if value:
            merged[key] = value
        else:
            merged.pop(key, None)
    return merged


def fields_problem(limits: LimitsConfig, name: str, metadata: str,
                   attributes: Mapping[str, str]) -> tuple[str, str] | None:
    """(limit name, message) when a participant's name, metadata or (merged) attributes are too large."""
    if limits.max_participant_name_length and len(name) > limits.max_participant_name_length:
        return "name", f"name is longer than {limits.max_participant_name_length} characters"
    if limits.max_metadata_size and len(metadata.encode()) > limits.max_metadata_size:
        return "metadata", f"metadata is larger than {limits.max_metadata_size} bytes"
    if limits.max_attributes_size and attributes_size(attributes) > limits.max_attributes_size:
        return "attributes", f"attributes are larger than {limits.max_attributes_size} bytes"
    return None


class TokenBucket:
    """`rate` units a second with bursts of up to `burst`; `take(n)` is False when over it (0 rate: no limit)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self.tokens = self.burst
        self.at = time.monotonic()

    def take(self, amount: float) -> bool:
        if not self.rate:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True
