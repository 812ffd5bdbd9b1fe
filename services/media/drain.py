"""A bounded drain: a media node hands its participants to other nodes, then closes what is left.

Draining marks the node DRAINING in the registry (the router places nothing new here, readiness fails).
Each participant is marked as moved in the store and told to reconnect (`leave` with action RECONNECT),
which the SDKs follow by themselves: they rejoin through the signal edge and land on another media node,
keeping their sid, with no `participant_left` / `participant_joined` webhooks for the move. Whoever is
still here at the deadline is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import time

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from .interfaces import MediaNode, Participant


log = logging.getLogger(__name__)

Reason = models.DisconnectReason
# How long a participant told to reconnect may keep its old session while its client rejoins elsewhere.
HANDOVER_GRACE = 2.0
MOVE_INTERVAL = 0.05  # spread the rejoins a little so the other nodes are not hit all at once


class Drain:
    def __init__(self, node: MediaNode, deadline: float):
        self.node = node
        self.deadline = deadline
        self.started_at = 0.0
        self.done = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._unmarking: set[asyncio.Task] = set()

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> dict:
        return {
            "state": self.node.state,
            "draining": self.active,
            "participants": sum(len(r.participants) for r in self.node.rooms.values()),
            "deadline_seconds": self.deadline,
            "elapsed_seconds": round(time.monotonic() - self.started_at, 1) if self.started_at else 0.0,
        }

    async def start(self) -> None:
        if self.active:
            return
        self.done.clear()
        self.started_at = time.monotonic()
        await self.node.set_state("DRAINING")
        self._task = asyncio.create_task(self._run(), name="media-drain")
        log.info("draining media node %s: %d participants, deadline %.0fs", self.node.node_id,
                 self.status()["participants"], self.deadline)

    async def cancel(self, resume_serving: bool = True) -> bool:
        """Stop draining and (unless shutting down) take joins again; participants already moved stay there."""
        if not self.active:
            return False
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if not resume_serving:
            return True
        await self.node.set_state("SERVING")
        log.info("drain of media node %s cancelled", self.node.node_id)
        return True

    async def _run(self) -> None:
        """Runs until everyone has moved or the deadline passed; `done` is not set when cancelled."""
        try:
            await asyncio.wait_for(self._move_everyone(), self.deadline)
        except asyncio.TimeoutError:
            left = self.status()["participants"]
            log.warning("drain deadline of %.0fs passed; disconnecting %d participants", self.deadline, left)
            for room in list(self.node.rooms.values()):
                await room.close(Reason.SERVER_SHUTDOWN)
        self.done.set()
        log.info("media node %s drained in %.1fs", self.node.node_id, time.monotonic() - self.started_at)

    async def _move_everyone(self) -> None:
        handovers: list[asyncio.Task] = []
        try:
            while True:
                waiting = [(room, p) for room in list(self.node.rooms.values())
                           for p in list(room.participants.values()) if not p.moving]
                for room, participant in waiting:
                    participant.moving = True
                    handovers.append(asyncio.create_task(self._move(room, participant)))
                    await asyncio.sleep(MOVE_INTERVAL)
                if not any(r.participants for r in self.node.rooms.values()):
                    return
                await asyncio.sleep(0.2)
        finally:
            for task in handovers:
                task.cancel()
            await asyncio.gather(*handovers, return_exceptions=True)

    async def _move(self, room, participant: Participant) -> None:
        # The record leaves the store before the client hears `leave`, so its rejoin elsewhere (same sid)
        # can never be deleted by this node's cleanup.
        told = False
        try:
            try:
                await self.node.store.delete_participant(room.name, participant.identity, participant.sid)
                await self.node.store.mark_moved(room.name, participant.identity, participant.sid,
                                                 ttl=self.deadline + 30, tracks=participant.published_infos())
            except Exception as exc:  # without the marker the rejoin is an ordinary join, still better than a drop
                log.warning("could not mark %s as moved: %r", participant, exc)
            participant.send(rtc_pb.SignalResponse(leave=rtc_pb.LeaveRequest(
                can_reconnect=True, reason=Reason.MIGRATION, action=rtc_pb.LeaveRequest.RECONNECT,
            )))
            told = True
            # Give the client a moment to read the leave, then end the old session as a migration.
            await asyncio.sleep(HANDOVER_GRACE)
        except asyncio.CancelledError:
            if told:  # the drain was cancelled, but this client is already on its way to another node
                room.schedule_remove(participant, Reason.MIGRATION, send_leave=False)
            else:  # cancelled before it was told: it stays, as an ordinary participant of this node
                participant.moving = False
                room.participant_changed(participant)  # its record back in the store
                self._unmark(room, participant)
            raise
        await room.remove(participant, Reason.MIGRATION, send_leave=False)

    def _unmark(self, room, participant: Participant) -> None:
        """Forget the move marker, so a later rejoin of this identity is an ordinary join (with its webhooks)."""
        async def unmark() -> None:
            try:
                await asyncio.wait_for(self.node.store.take_moved(room.name, participant.identity), 2.0)
            except Exception as exc:
                log.warning("could not clear the move marker of %s: %r", participant, exc)

        task = asyncio.create_task(unmark(), name=f"drain-unmark-{participant.sid}")
        self._unmarking.add(task)
        task.add_done_callback(self._unmarking.discard)
