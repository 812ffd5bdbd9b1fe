"""Resume on the media node in-process, through its `Session` contract (no SDK): message order, both orders of
the new connection and the old one's close, refusals, the backlog, sync_state, reliable data, ICE restart seams,
and the webhooks that result."""

from __future__ import annotations

import asyncio

import pytest
from aioice import stun
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import media_pb2
from braid.services.media.ice import IceHost, NodeIceConnection, UfragTable
from braid.services.media.link import SignalLink, replayable
from braid.services.media.node import MediaNode
from braid.services.media.reliable import InboundSequence, ReliableLog
from braid.shared.auth import mint_token
from braid.shared.bus import MemoryBus
from braid.shared.config import load_config
from braid.shared.store import MemoryRegistry, MemoryStore

from .servers import rtc_overrides
from .session_stream import Stream

pytestmark = pytest.mark.timeout(30)
Reason = models.DisconnectReason
REAP = 0.2


class Notifier:
    def __init__(self):
        self.events = []

    def notify(self, event) -> None:
        self.events.append(event)

    def names(self, sid: str) -> list[str]:
        return [e.event for e in self.events if e.participant.sid == sid]


@pytest.fixture
async def node():
    config = load_config(dev=True, env={}, overrides={
        "rtc": rtc_overrides(),
        "telemetry": {"worker_reap_delay": REAP, "stats_interval": 0.05},
    })
    media = MediaNode(config, MemoryStore(), MemoryBus(), MemoryRegistry(), Notifier(), "ND_resume", "127.0.0.1:1")
    await media.start()
    await media.store.create_room(models.Room(sid="RM_r", name="r"))
    yield media
    await media.stop()


class Session:
    """One Session stream: what the test sends (`up`) and everything the node answered so far."""

    def __init__(self, node: MediaNode, start: media_pb2.SessionUp):
        self.up = Stream(start)
        self.down: list[media_pb2.SessionDown] = []
        self.finished = asyncio.Event()
        self._task = asyncio.create_task(self._run(node.servicer.Session(self.up, None)))

    async def _run(self, gen) -> None:
        try:
            async for down in gen:
                self.down.append(down)
        finally:
            self.finished.set()

    def responses(self) -> list[rtc_pb.SignalResponse]:
        return [rtc_pb.SignalResponse.FromString(d.response) for d in self.down if d.WhichOneof("message") == "response"]

    def kinds(self) -> list[str]:
        return [r.WhichOneof("message") for r in self.responses()]

    async def wait(self, predicate, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.up.push(None)
        await asyncio.wait_for(self.finished.wait(), 5)


def _token(identity: str) -> str:
    return mint_token("devkey", "secret", identity=identity, video={"roomJoin": True, "room": "r"})


def _start(identity: str, *, sid: str = "", single_pc: bool = True,
           conn: str = "") -> media_pb2.SessionUp:
    join = rtc_pb.JoinRequest(connection_settings=rtc_pb.ConnectionSettings(auto_subscribe=True),
                              reconnect=bool(sid), participant_sid=sid)
    return media_pb2.SessionUp(start=media_pb2.SessionStart(
        room="r", identity=identity, token=_token(identity),
        join_request=join.SerializeToString(), single_pc=single_pc, reconnect=bool(sid), participant_sid=sid,
        connection_id=conn or f"conn-{identity}-{sid or 'join'}"))


async def _join(node: MediaNode, identity: str, active: bool = True):
    session = Session(node, _start(identity))
    await session.wait(lambda s: "join" in s.kinds())
    p = node.rooms["r"].by_identity(identity)
    if active:
        p._on_transport_state("pc", "connected")  # what a connected transport reports
    return session, p


def _worker(node: MediaNode, p):
    return node.telemetry.worker("r", p.sid)


async def _settle(node: MediaNode) -> None:
    await asyncio.sleep(0.01)
    await node.telemetry.drain()


async def test_resume_sends_reconnect_first_then_snapshot_then_room(node):
    first, alice = await _join(node, "alice")
    _, bob = await _join(node, "bob")
    resumed = Session(node, _start("alice", sid=alice.sid))
    await resumed.wait(lambda s: len(s.kinds()) >= 3)
    reconnect, update, room_update = resumed.responses()[:3]
    assert reconnect.WhichOneof("message") == "reconnect"
    assert reconnect.reconnect.server_info.version and reconnect.reconnect.last_message_seq == 0
    assert {p.identity for p in update.update.participants} == {"alice", "bob"}, "a snapshot including self"
    assert room_update.room_update.room.name == "r" and room_update.room_update.room.num_participants == 2
    # The old stream (still open: the new connection came first) ends, without closing the participant.
    await asyncio.wait_for(first.finished.wait(), 5)
    assert not any(d.WhichOneof("message") == "close" for d in first.down)
    first.up.end()  # its late end changes nothing
    await _settle(node)
    assert alice.signal_connected and not alice.closed and alice.link.connection_id == f"conn-alice-{alice.sid}"
    assert _worker(node, alice).ref_count == 2  # the session and the new connection; the old one let go
    resumed.up.request(ping_req=rtc_pb.Ping(timestamp=7))  # the new link carries requests and responses
    await resumed.wait(lambda s: "pong_resp" in s.kinds())
    await resumed.close()
    await bob.room.remove(bob, Reason.CLIENT_INITIATED, send_leave=False)


async def test_resume_after_the_old_connection_closed_and_again_webhooks_once(node):
    notifier: Notifier = node.notifier
    first, alice = await _join(node, "alice")
    first.up.end()  # the WebSocket dropped: the participant waits for a resume
    await asyncio.wait_for(first.finished.wait(), 5)
    assert not alice.signal_connected and not alice.closed
    await asyncio.sleep(REAP * 2)  # beyond the reap delay
    second = Session(node, _start("alice", sid=alice.sid, conn="c2"))
    await second.wait(lambda s: s.kinds()[:1] == ["reconnect"])
    assert alice.signal_connected
    third = Session(node, _start("alice", sid=alice.sid, conn="c3"))  # a second resume, before c2 closes
    await third.wait(lambda s: s.kinds()[:1] == ["reconnect"])
    await asyncio.wait_for(second.finished.wait(), 5)
    await asyncio.sleep(REAP * 2)
    await _settle(node)
    worker = _worker(node, alice)
    assert worker is not None and not worker.closed and worker.ref_count == 2
    third.up.request(leave=rtc_pb.LeaveRequest(reason=Reason.CLIENT_INITIATED))
    await asyncio.wait_for(third.finished.wait(), 5)
    await asyncio.sleep(REAP * 2)
    await _settle(node)
    assert notifier.names(alice.sid) == ["participant_joined", "participant_left"]
    left = [e for e in notifier.events if e.event == "participant_left"][0]
    assert left.participant.disconnect_reason == Reason.CLIENT_INITIATED
    assert len({e.id for e in notifier.events}) == len(notifier.events)


async def test_never_active_then_resumed_then_gone_is_connection_aborted(node):
    first, alice = await _join(node, "alice", active=False)
    first.up.end()
    resumed = Session(node, _start("alice", sid=alice.sid))
    await resumed.wait(lambda s: s.kinds()[:1] == ["reconnect"])
    await alice.room.remove(alice, Reason.CONNECTION_TIMEOUT, send_leave=True)
    await asyncio.wait_for(resumed.finished.wait(), 5)
    assert resumed.kinds()[-1] == "leave" and resumed.down[-1].WhichOneof("message") == "close"
    await _settle(node)
    assert node.notifier.names(alice.sid) == ["participant_connection_aborted"]


@pytest.mark.parametrize("case", ["unknown sid", "other identity", "other mode", "leaving"])
async def test_resume_refused_with_reconnect_leave(node, case):
    _, alice = await _join(node, "alice")
    start = {
        "unknown sid": _start("alice", sid="PA_nobody"),
        "other identity": _start("mallory", sid=alice.sid),
        "other mode": _start("alice", sid=alice.sid, single_pc=False),
        "leaving": _start("alice", sid=alice.sid),
    }[case]
    if case == "leaving":
        alice.removing = True
    refused = Session(node, start)
    await asyncio.wait_for(refused.finished.wait(), 5)
    (leave,) = refused.responses()
    assert leave.leave.action == rtc_pb.LeaveRequest.RECONNECT and leave.leave.reason == Reason.STATE_MISMATCH
    assert refused.down[-1].WhichOneof("message") == "close"
    assert alice.signal_connected and not alice.closed, "a refused resume leaves the participant alone"


async def test_backlog_replayed_after_the_snapshot(node):
    first, alice = await _join(node, "alice")
    first.up.end()
    await asyncio.wait_for(first.finished.wait(), 5)
    alice.send(rtc_pb.SignalResponse(track_unpublished=rtc_pb.TrackUnpublishedResponse(track_sid="TR_gone")))
    _, bob = await _join(node, "bob")  # broadcasts an `update` to alice while she is away: superseded
    _, carol = await _join(node, "carol")
    await carol.room.remove(carol, Reason.CLIENT_INITIATED, send_leave=False)  # gone: her update must stay
    alice.send(rtc_pb.SignalResponse(request_response=rtc_pb.RequestResponse(request_id=5)))
    resumed = Session(node, _start("alice", sid=alice.sid))
    await resumed.wait(lambda s: "request_response" in s.kinds())
    kinds = resumed.kinds()
    assert kinds[:3] == ["reconnect", "update", "room_update"]
    assert {p.identity for p in resumed.responses()[1].update.participants} == {"alice", "bob"}
    assert kinds[3:] == ["track_unpublished", "request_response", "update"], kinds
    (gone,) = resumed.responses()[5].update.participants
    assert gone.identity == "carol" and gone.state == models.ParticipantInfo.DISCONNECTED
    await resumed.close()


async def test_sync_state_applies_subscriptions_published_tracks_and_reliable_data(node):
    first, alice = await _join(node, "alice")
    first.up.end()
    resumed = Session(node, _start("alice", sid=alice.sid))
    await resumed.wait(lambda s: "reconnect" in s.kinds())
    sent = []
    alice.data._deliver = lambda reliable, payload: sent.append(payload) or True
    for seq in (1, 2, 3):
        alice.data.send(True, f"b{seq}".encode(), "PA_bob", seq)
    alice.data.send(True, b"c1", "PA_carol", 1)
    alice.data.send(True, b"unsequenced", "", 0)
    sent.clear()
    resumed.up.request(sync_state=rtc_pb.SyncState(
        subscription=rtc_pb.UpdateSubscription(track_sids=["TR_unknown"], subscribe=True),
        publish_tracks=[rtc_pb.TrackPublishedResponse(cid="c", track=models.TrackInfo(sid="TR_lost"))],
        datachannel_receive_states=[rtc_pb.DataChannelReceiveState(publisher_sid="PA_bob", last_seq=1)],
    ))
    await resumed.wait(lambda s: "track_unpublished" in s.kinds() and "subscription_response" in s.kinds())
    assert sent == [b"b2", b"b3", b"c1"], "after the client's last sequence; unlisted senders' recent ones"
    by_kind = {r.WhichOneof("message"): r for r in resumed.responses()}
    assert by_kind["track_unpublished"].track_unpublished.track_sid == "TR_lost"
    assert by_kind["subscription_response"].subscription_response.err == models.SubscriptionError.SE_TRACK_NOTFOUND
    await resumed.close()


# --- units -------------------------------------------------------------------------------------------------------


def test_inbound_sequence_drops_resent_copies():
    seq = InboundSequence()
    assert [seq.accept(s) for s in (1, 2, 2, 1, 3, 0, 0)] == [True, True, False, False, True, True, True]
    assert seq.last == 3


def test_reliable_log_bounds_and_windows():
    now = [100.0]
    log = ReliableLog(max_packets=4, max_age=30.0, clock=lambda: now[0])
    log.record("PA_a", 1, b"a1")
    now[0] += 25  # older than the unlisted window, still kept
    for seq in (2, 3):
        log.record("PA_a", seq, b"a%d" % seq)
    log.record("PA_b", 1, b"b1")
    log.record("", 5, b"server")  # unsequenced or senderless: never resent
    assert log.missing({"PA_a": 2}) == [b"a3", b"b1"]
    assert log.missing({}) == [b"a2", b"a3", b"b1"], "a1 is too old for a sender the client does not list"
    log.record("PA_a", 4, b"a4")
    log.record("PA_a", 5, b"a5")
    assert len(log) == 4
    now[0] += 31
    assert log.missing({}) == [] and len(log) == 0
    small = ReliableLog(max_bytes=10, clock=lambda: now[0])
    for seq in (1, 2, 3):
        small.record("PA_a", seq, b"12345")
    assert small.missing({"PA_a": 0}) == [b"12345"] * 2, "bounded in bytes too"


def test_link_backlog_and_replay_filter():
    link = SignalLink("c1")
    for message in (rtc_pb.SignalResponse(update=rtc_pb.ParticipantUpdate()),
                    rtc_pb.SignalResponse(mute=rtc_pb.MuteTrackRequest(sid="TR_x", muted=True)),
                    rtc_pb.SignalResponse(offer=rtc_pb.SessionDescription(type="offer"))):
        link.queue.put_nowait(message.SerializeToString())
    link.end()
    link.end()
    link.queue.put_nowait(b"\xff\xff")  # undecodable: dropped
    backlog = link.take_backlog()
    assert len(backlog) == 4 and link.queue.empty()
    assert [rtc_pb.SignalResponse.FromString(b).WhichOneof("message") for b in replayable(backlog)] == ["mute"]


class _Protocol:
    def __init__(self):
        self.sent = []

    def send_stun(self, message, addr) -> None:
        self.sent.append(message)


def _check(username: str, password: str) -> stun.Message:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    msg.attributes["PRIORITY"] = 1
    msg.attributes["ICE-CONTROLLING"] = 1
    msg.add_message_integrity(password.encode())
    return msg


def _answered(conn: NodeIceConnection, username: str, password: str) -> bool:
    protocol = _Protocol()
    conn.request_received(_check(username, password), ("127.0.0.1", 9), protocol)
    return protocol.sent[-1].message_class == stun.Class.RESPONSE


async def test_ice_restart_credentials_switch_on_first_check_and_previous_generation_still_answered():
    ufrags = UfragTable()  # as on the node's shared ports: checks are routed by ufrag
    conn = IceHost([], ufrags).connection(controlling=False)
    conn.remote_username, conn.remote_password = "old", "o" * 22
    me, my_pwd = conn.local_username, conn.local_password
    conn.restart_remote("new", "n" * 22)
    assert (conn.remote_username, conn.remote_password) == ("old", "o" * 22), "kept until the peer uses the new"
    assert _answered(conn, f"{me}:old", my_pwd)
    assert _answered(conn, f"{me}:new", my_pwd)
    assert (conn.remote_username, conn.remote_password) == ("new", "n" * 22)
    assert _answered(conn, f"{me}:old", my_pwd), "the previous generation is answered until pruned"
    assert not _answered(conn, f"{me}:other", my_pwd)
    assert not _answered(conn, f"{me}:new", "x" * 22)

    conn.restart_local()  # our restart offer (v0 subscriber PC)
    assert conn.local_username != me
    assert _answered(conn, f"{conn.local_username}:new", conn.local_password)
    assert _answered(conn, f"{me}:new", my_pwd), "checks with our previous credentials still answered"
    assert not _answered(conn, f"{me}:new", conn.local_password)
    assert ufrags.get(me) is conn and ufrags.get(conn.local_username) is conn, "both generations are routed"
    await conn.close()
    assert len(ufrags) == 0
