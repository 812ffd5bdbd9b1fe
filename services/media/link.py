"""One signal connection of a participant: the `Session` stream it is reached through.

A participant outlives its signal connections: a resume attaches a new link while the old one may still be
open (the edge has not noticed the dead WebSocket yet) or already gone. Each link owns its outgoing queue and
its telemetry guard, so an old stream that ends late can neither steal messages from the new one nor end it.
What was queued for a link nobody reads any more (the signal was down) is the backlog a resume replays.
"""

from __future__ import annotations

import asyncio

from google.protobuf.message import DecodeError
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from .telemetry import ReferenceGuard

MAX_BACKLOG = 512
# Superseded by what a resume sends anyway (the snapshot, a fresh offer) or meaningless after the gap.
STALE_AFTER_GAP = frozenset({
    "join", "reconnect", "update", "room_update", "offer", "answer", "trickle", "pong", "pong_resp",
    "speakers_changed", "connection_quality",
})


class SignalLink:
    def __init__(self, connection_id: str = "") -> None:
        self.connection_id = connection_id
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.guard = ReferenceGuard(holder=f"signal:{connection_id}")
        self.ended = False

    def __repr__(self) -> str:
        return f"SignalLink({self.connection_id}{', ended' if self.ended else ''})"

    def push(self, data: bytes, limit: int) -> bool:
        """Queue a response unless `limit` (0: none) are already waiting; False means the reader is too slow."""
        if limit and self.queue.qsize() >= limit:
            return False
        self.queue.put_nowait(data)
        return True

    def force(self, data: bytes | None) -> None:
        """Queue past the limit: the last words to a client being dropped, or the end sentinel."""
        self.queue.put_nowait(data)

    def end(self) -> None:
        """Wake the stream serving this link so it finishes (idempotent)."""
        if not self.ended:
            self.ended = True
            self.queue.put_nowait(None)

    def take_backlog(self) -> list[bytes]:
        """Everything still queued (the sentinel aside), oldest first; the queue is left empty."""
        items: list[bytes] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None:
                items.append(item)
        return items


def replayable(backlog: list[bytes], present: set[str] = frozenset()) -> list[bytes]:
    """The queued responses still worth delivering after a resume, in order (bounded, newest kept).

    `update`s are superseded by the snapshot, except for participants that left meanwhile (`present` holds the
    sids still in the room): the snapshot cannot say someone is gone, so their latest state follows, in one
    `update` at the end.
    """
    keep: list[bytes] = []
    gone: dict[str, models.ParticipantInfo] = {}
    for data in backlog:
        try:
            response = rtc_pb.SignalResponse.FromString(data)
        except DecodeError:
            continue
        which = response.WhichOneof("message")
        if which == "update":
            for info in response.update.participants:
                if info.sid not in present and info.version >= gone.get(info.sid, info).version:
                    gone[info.sid] = info
        elif which is not None and which not in STALE_AFTER_GAP:
            keep.append(data)
    keep = keep[-MAX_BACKLOG:]
    if gone:
        keep.append(rtc_pb.SignalResponse(update=rtc_pb.ParticipantUpdate(participants=list(gone.values())))
                    .SerializeToString())
    return keep
