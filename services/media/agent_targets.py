"""The participant events agent jobs are launched on, told to the routers over the bus.

LiveKit gives a room's dispatches one JT_PARTICIPANT job per participant that joins and one JT_PUBLISHER job per
participant that first publishes (to workers registered with that job type); agents and egress get none. The
routers own dispatch (services/router/agents.py): this node only says what happened here, and a claim in the agent
store makes each job once however many nodes and routers hear of it.
"""

from __future__ import annotations

import logging

from livekit.protocol import agent as agent_pb

from braid.shared.agents import DEPENDENT_KINDS, TARGETS_CHANNEL, encode
from braid.shared.bus import Bus
from braid.shared.tasks import OwnedTasks

from .hooks import Hooks
from .interfaces import Participant, Room

log = logging.getLogger(__name__)


class AgentTargetHooks:
    """The node's hooks, plus the agent target events (every other hook goes straight to `inner`)."""

    def __init__(self, inner: Hooks, bus: Bus):
        self.inner = inner
        self.bus = bus
        self.tasks = OwnedTasks()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def participant_active(self, room: Room, participant: Participant) -> None:
        self.inner.participant_active(room, participant)
        if not participant.migrated:  # a participant moved from another node joined there
            self._tell(room, participant, agent_pb.JT_PARTICIPANT)

    def track_published(self, room: Room, participant: Participant, track) -> None:
        self.inner.track_published(room, participant, track)
        self._tell(room, participant, agent_pb.JT_PUBLISHER)  # the routers' claim keeps only the first

    def _tell(self, room: Room, participant: Participant, job_type: int) -> None:
        info = participant.info()
        if info.kind in DEPENDENT_KINDS:
            return
        event = encode("target", room=room.name, job_type=job_type, participant=info)
        self.tasks.spawn(self._publish(event), f"agent-target-{participant.sid}")

    async def _publish(self, event: bytes) -> None:
        try:
            await self.bus.publish(TARGETS_CHANNEL, event)
        except Exception as exc:  # the bus is down: like LiveKit's launch, the job is not retried later
            log.warning("could not announce an agent target: %r", exc)

    async def close(self) -> None:
        await self.tasks.cancel_all()
