"""Per-holder references on a stats worker.

Two kinds of holder report join/leave for the same participant: the participant session and every signal
connection (one per WebSocket, so a resume brings a new one while the old one is still closing). A bare integer
counter goes wrong as soon as one holder reports twice or reports late, so each holder gets its own
`ReferenceGuard`, and a guard can move the count at most +1 and then -1, once, in that order:

* activating twice is a no-op;
* releasing twice, or releasing a guard that was never activated, is a no-op for the count;
* a released guard is spent: it can never be activated again, so it can never resurrect a worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class ReferenceGuard:
    """One holder's reference. Create a fresh guard per holder (per session, per signal connection)."""

    holder: str = ""  # label for logs only, e.g. "session" or "signal:<conn id>"
    _count: ReferenceCount | None = field(default=None, init=False, repr=False)
    _released: bool = field(default=False, init=False)

    @property
    def activated(self) -> bool:
        """True once this guard has taken its reference (stays True after release)."""
        return self._count is not None

    @property
    def released(self) -> bool:
        return self._released

    @property
    def active(self) -> bool:
        """True while this guard holds a reference."""
        return self._count is not None and not self._released

    @property
    def owner(self) -> Any:
        """Whatever owns the count this guard was activated on (the stats worker), or None."""
        return self._count.owner if self._count is not None else None

    def release(self) -> bool:
        """Give the reference back. True only if this very call dropped the count to zero.

        Releasing marks the guard spent even when it was never activated, so a late activation is refused.
        """
        if self._released:
            return False
        self._released = True
        if self._count is None:
            return False
        return self._count._decrement()


class ReferenceCount:
    """The counter a worker owns; only guards can move it, so it cannot go negative."""

    __slots__ = ("owner", "_value")

    def __init__(self, owner: Any = None) -> None:
        self.owner = owner
        self._value = 0

    @property
    def value(self) -> int:
        return self._value

    def acquire(self, guard: ReferenceGuard) -> bool:
        """Take `guard`'s reference on this count. False (and no change) if the guard is already used or spent."""
        if guard._released or guard._count is not None:
            return False
        guard._count = self
        self._value += 1
        return True

    def release(self, guard: ReferenceGuard) -> bool:
        """Release `guard` if it belongs here. True only if this call dropped the count to zero.

        A guard activated on another count is left alone (releasing it here would decrement the wrong worker).
        """
        if guard._count is not None and guard._count is not self:
            return False
        return guard.release()

    def _decrement(self) -> bool:
        if self._value <= 0:  # unreachable through guards; kept so a bug cannot push the count below zero
            return False
        self._value -= 1
        return self._value == 0
