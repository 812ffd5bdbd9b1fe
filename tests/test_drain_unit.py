"""The drain's own rules with a stand-in node: state, markers, leave RECONNECT, cancel, deadline."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.services.media import drain as drain_mod
from braid.services.media.drain import Drain
from braid.shared.store import MemoryStore


class FakeParticipant:
    def __init__(self, identity: str, sid: str):
        self.identity, self.sid, self.moving, self.sent = identity, sid, False, []

    def published_infos(self) -> list[models.TrackInfo]:
        return [models.TrackInfo(sid=f"TR_{self.identity}", name="cam")]

    def send(self, response: rtc_pb.SignalResponse) -> None:
        self.sent.append(response)


class FakeRoom:
    def __init__(self, name: str, people: list[FakeParticipant], sticky: bool = False):
        self.name = name
        self.participants = {p.sid: p for p in people}
        self.sticky = sticky  # a participant that never goes away by itself
        self.removed: list[tuple[str, int]] = []
        self.closed_with: int | None = None

    async def remove(self, p, reason, send_leave):
        self.removed.append((p.sid, reason))
        if not self.sticky:
            self.participants.pop(p.sid, None)

    async def close(self, reason):
        self.closed_with = reason
        self.participants.clear()


def fake_node(rooms):
    node = SimpleNamespace(node_id="ND_x", state="SERVING", rooms={r.name: r for r in rooms}, store=MemoryStore())

    async def set_state(state):
        node.state = state

    node.set_state = set_state
    return node


async def test_everyone_is_told_to_reconnect_and_marked_moved(monkeypatch):
    monkeypatch.setattr(drain_mod, "HANDOVER_GRACE", 0.01)
    people = [FakeParticipant("a", "PA_a"), FakeParticipant("b", "PA_b")]
    room = FakeRoom("r", people)
    node = fake_node([room])
    drain = Drain(node, deadline=5)
    await drain.start()
    assert node.state == "DRAINING" and drain.active
    await asyncio.wait_for(drain.done.wait(), 5)
    for p in people:
        leave = p.sent[0].leave
        assert (leave.action, leave.reason, leave.can_reconnect) == (
            rtc_pb.LeaveRequest.RECONNECT, models.DisconnectReason.MIGRATION, True)
        moved = await node.store.take_moved("r", p.identity)
        assert moved.sid == p.sid and [t.sid for t in moved.tracks] == [f"TR_{p.identity}"]
    assert sorted(room.removed) == [("PA_a", models.DisconnectReason.MIGRATION),
                                    ("PA_b", models.DisconnectReason.MIGRATION)]


async def test_cancel_resumes_serving_without_finishing(monkeypatch):
    monkeypatch.setattr(drain_mod, "HANDOVER_GRACE", 10)
    node = fake_node([FakeRoom("r", [FakeParticipant("a", "PA_a")])])
    drain = Drain(node, deadline=30)
    await drain.start()
    await asyncio.sleep(0.1)
    assert await drain.cancel()
    assert node.state == "SERVING" and not drain.active
    assert not drain.done.is_set(), "a cancelled drain does not end the process"
    assert not await drain.cancel(), "nothing left to cancel"


async def test_deadline_disconnects_whoever_is_left(monkeypatch):
    monkeypatch.setattr(drain_mod, "HANDOVER_GRACE", 0.01)
    room = FakeRoom("r", [FakeParticipant("a", "PA_a")], sticky=True)
    node = fake_node([room])
    drain = Drain(node, deadline=0.5)
    await drain.start()
    await asyncio.wait_for(drain.done.wait(), 5)
    assert room.closed_with == models.DisconnectReason.SERVER_SHUTDOWN
