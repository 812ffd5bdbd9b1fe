"""One room spanning media nodes: official SDK clients through different signal nodes of a real cluster.

Every process is separate (router, signal nodes, media nodes) on a private redis-server. Clients are placed by the
region of the signal node they connect to and by the media nodes' hard limits; tracks cross between media nodes
over the SRTP relay, room-wide events over Redis pub/sub.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit import api, rtc

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia, dominant_frequency, pattern_matches

from .cluster import KEY, SECRET, start_cluster, stop_cluster, wait_for

pytestmark = pytest.mark.timeout(150)


def _audio_ok(obs: Observer, sender: str, freq: float, seconds: float = 1.0) -> bool:
    got = obs.received.get(sender)
    if got is None:
        return False
    n = int(48000 * seconds)
    samples = got.audio()
    return len(samples) >= n and abs(dominant_frequency(samples[-n:]) - freq) < 8


def _video_ok(obs: Observer, sender: str, size=(320, 240), frames: int = 10) -> bool:
    got = obs.received.get(sender)
    return bool(got and got.frames >= frames and got.size == size and pattern_matches(got.last_frame))


def _describe(obs: Observer, sender: str) -> str:
    got = obs.received.get(sender)
    if got is None:
        return f"{obs.identity} got nothing from {sender}; events {obs.events}"
    return f"{obs.identity} from {sender}: {got.frames} frames of {got.size}, {len(got.audio())} audio samples"


async def _join(node, room: str, identity: str) -> Observer:
    obs = Observer(identity)
    await obs.connect(node.server.ws_url, join_token(KEY, SECRET, room, identity))
    return obs


async def _media_flowing(a: Observer, a_freq: float, b: Observer, b_freq: float, timeout: float) -> bool:
    return await wait_until(lambda: _audio_ok(a, b.identity, b_freq) and _audio_ok(b, a.identity, a_freq)
                            and _video_ok(a, b.identity) and _video_ok(b, a.identity), timeout)


@pytest.fixture
def cluster(tmp_path, redis_server, webhook_sink):
    c = start_cluster(tmp_path, redis_server, media_regions=("eu-west", "us-east", "eu-west"),
                      env={"BRAID_WEBHOOK__URLS": webhook_sink.url, "BRAID_ROOM__DEPARTURE_TIMEOUT": "1"},
                      media_env={"BRAID_LIMITS__MAX_PARTICIPANTS": "1"}, routers=2)
    yield c
    stop_cluster(c)


async def test_room_spans_media_nodes(cluster, webhook_sink, room_name, request):
    """A (eu edge) and B (us edge) land on media nodes of their regions and exchange audio, video and data;
    C (eu edge, its region's first node full) lands on a third node and receives both; each webhook is sent once
    (participants' by their media node, the room's by the one of two routers holding the reaper lease)."""
    eu, us = cluster.signal("eu-west"), cluster.signal("us-east")
    a = await _join(eu, room_name, "alice")
    b = await _join(us, room_name, "bob")
    media_a, media_b, observers = DemoMedia(frequency=440), DemoMedia(frequency=660), [a, b]
    try:
        hosting = cluster.media_hosting()
        assert hosting["media-2"] == 1, hosting  # us-east: bob
        first_eu = "media-1" if hosting["media-1"] else "media-3"
        assert hosting[first_eu] == 1, hosting
        assert a.room.remote_participants.get("bob") is not None or await wait_until(
            lambda: "bob" in {p.identity for p in a.room.remote_participants.values()}, 5)

        await media_a.start(a.room)
        await media_b.start(b.room)
        assert await _media_flowing(a, 440, b, 660, 25), (_describe(a, "bob"), _describe(b, "alice"))

        await a.room.local_participant.publish_data(b"reliable-from-a", reliable=True, topic="t")
        await a.room.local_participant.publish_data(b"lossy-from-a", reliable=False)
        await b.room.local_participant.publish_data(b"reliable-from-b", reliable=True)
        assert await wait_until(lambda: {p.data for p in b.data} >= {b"reliable-from-a", b"lossy-from-a"}, 10)
        assert await wait_until(lambda: any(p.data == b"reliable-from-b" for p in a.data), 10)
        packet = next(p for p in b.data if p.data == b"reliable-from-a")
        assert packet.participant is not None and packet.participant.identity == "alice" and packet.topic == "t"
        assert await wait_until(lambda: any("alice" in d.split(",") for e, d in b.events if e == "speakers"), 10)

        # The eu node that hosts alice is full (max_participants 1): carol goes to the other eu node.
        assert await wait_for(lambda: any(n["participants"] >= 1 for n in cluster.registry().values()
                                          if n["node_id"] == f"ND_{first_eu.replace('-', '')}"), 10)
        c = await _join(eu, room_name, "carol")
        observers.append(c)
        hosting = cluster.media_hosting()
        assert hosting == {"media-1": 1, "media-2": 1, "media-3": 1}, hosting
        assert await wait_until(lambda: _audio_ok(c, "alice", 440) and _audio_ok(c, "bob", 660)
                                and _video_ok(c, "alice") and _video_ok(c, "bob"), 25), (
            _describe(c, "alice"), _describe(c, "bob"))
        await a.room.local_participant.publish_data(b"only-for-carol", reliable=True, destination_identities=["carol"])
        assert await wait_until(lambda: any(p.data == b"only-for-carol" for p in c.data), 10)
        await asyncio.sleep(0.5)
        assert not any(p.data == b"only-for-carol" for p in b.data)

        lk = api.LiveKitAPI(us.server.http_url, KEY, SECRET)
        try:
            listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
            assert sorted(p.identity for p in listed.participants) == ["alice", "bob", "carol"]
            await lk.room.send_data(api.SendDataRequest(room=room_name, data=b"from-api", kind=0))
            assert await wait_until(lambda: all(any(p.data == b"from-api" for p in o.data) for o in observers), 10)
        finally:
            await lk.aclose()
    except BaseException:
        request.node.cluster_logs = cluster.logs()
        print(cluster.logs())
        raise
    finally:
        await media_a.stop()
        await media_b.stop()
        for obs in observers:
            await obs.close()

    def events(name: str) -> list[dict]:
        return [d.event for d in webhook_sink.for_room(room_name) if d.event["event"] == name]

    assert await wait_for(lambda: len(events("room_finished")) == 1, 20), [
        d.event["event"] for d in webhook_sink.for_room(room_name)]
    await asyncio.sleep(1.0)  # anything duplicated would have arrived by now
    joined = sorted(e["participant"]["identity"] for e in events("participant_joined"))
    left = sorted(e["participant"]["identity"] for e in events("participant_left"))
    assert joined == ["alice", "bob", "carol"] and left == ["alice", "bob", "carol"], (joined, left)
    assert len(events("room_started")) == 1 and len(events("room_finished")) == 1
    assert len(events("track_published")) == 4, [e["track"]["sid"] for e in events("track_published")]


class Progress:
    """How much of a sender's media a receiver has had so far, to see that fresh media keeps arriving."""

    def __init__(self, obs: Observer, sender: str):
        self.obs, self.sender = obs, sender
        got = obs.received.get(sender)
        self.samples = len(got.audio()) if got else 0
        self.frames = got.frames if got else 0

    def fresh(self, freq: float, seconds: float = 1.0, frames: int = 10) -> bool:
        got = self.obs.received.get(self.sender)
        if got is None:
            return False
        samples = got.audio()
        n = int(48000 * seconds)
        return (len(samples) - self.samples >= n and abs(dominant_frequency(samples[-n:]) - freq) < 8
                and got.frames - self.frames >= frames and pattern_matches(got.last_frame))


@pytest.fixture
def two_region_cluster(tmp_path, redis_server):
    c = start_cluster(tmp_path, redis_server, media_regions=("eu-west", "us-east", "eu-west"), port_base=52000)
    yield c
    stop_cluster(c)


async def test_media_node_killed_mid_call(two_region_cluster, room_name):
    """kill -9 of the node hosting alice: the edge tells her SDK to reconnect, it lands on the other eu node, and
    media flows both ways again within 10 s."""
    cluster = two_region_cluster
    a = await _join(cluster.signal("eu-west"), room_name, "alice")
    b = await _join(cluster.signal("us-east"), room_name, "bob")
    media_a, media_b = DemoMedia(frequency=440), DemoMedia(frequency=660)
    try:
        await media_a.start(a.room)
        await media_b.start(b.room)
        assert await _media_flowing(a, 440, b, 660, 25), (_describe(a, "bob"), _describe(b, "alice"))
        hosting = cluster.media_hosting()
        victim = next(n for n in cluster.media if n.region == "eu-west" and hosting[n.name] == 1)
        survivor = next(n for n in cluster.media if n.region == "eu-west" and n is not victim)
        from_a, from_b = Progress(b, "alice"), Progress(a, "bob")
        victim.kill()
        killed_at = time.monotonic()
        assert await wait_until(lambda: from_a.fresh(440) and from_b.fresh(660), 10), (
            _describe(a, "bob"), _describe(b, "alice"), a.events[-10:])
        elapsed = time.monotonic() - killed_at
        assert survivor.participants() == 1, cluster.media_hosting()
        print(f"media back {elapsed:.1f} s after kill -9")
        # The dead node's registry entry expires; the router never places on it again.
        assert await wait_for(lambda: victim.name.replace("-", "") not in
                              {k.replace("ND_", "") for k in cluster.registry()}, 15)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await media_a.stop()
        await media_b.stop()
        await a.close()
        await b.close()


async def test_mute_unpublish_and_leave_cross_nodes(two_region_cluster, room_name):
    """Track state set on one node reaches subscribers on the other: mute, unmute (media resumes), unpublish,
    and the publisher leaving."""
    cluster = two_region_cluster
    a = await _join(cluster.signal("eu-west"), room_name, "alice")
    b = await _join(cluster.signal("us-east"), room_name, "bob")
    media = DemoMedia(frequency=440)
    try:
        await media.start(a.room)
        assert await wait_until(lambda: _audio_ok(b, "alice", 440) and _video_ok(b, "alice"), 25), _describe(
            b, "alice")
        audio_pub, video_pub = media.publications
        audio_pub.track.mute()
        assert await wait_until(lambda: b.saw("track_muted", audio_pub.sid), 10)
        audio_pub.track.unmute()
        assert await wait_until(lambda: b.saw("track_unmuted", audio_pub.sid), 10)
        resumed = Progress(b, "alice")
        assert await wait_until(lambda: resumed.fresh(440), 10)
        await a.room.local_participant.unpublish_track(video_pub.sid)
        assert await wait_until(lambda: b.saw("track_unpublished", video_pub.sid), 10)
        await media.stop()
        await a.close()
        assert await wait_until(lambda: b.saw("participant_disconnected", "alice"), 10)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await media.stop()
        await a.close()
        await b.close()


async def test_redis_outage_keeps_calls_and_refuses_joins(two_region_cluster, redis_server, room_name):
    """Redis stopped: media in progress keeps flowing (on each node and across them), joins fail fast with 503;
    Redis restarted (empty): everything comes back by itself and a new participant receives both publishers."""
    cluster = two_region_cluster
    eu, us = cluster.signal("eu-west"), cluster.signal("us-east")
    a = await _join(eu, room_name, "alice")
    b = await _join(us, room_name, "bob")
    media_a, media_b, observers = DemoMedia(frequency=440), DemoMedia(frequency=660), [a, b]
    try:
        await media_a.start(a.room)
        await media_b.start(b.room)
        assert await _media_flowing(a, 440, b, 660, 25), (_describe(a, "bob"), _describe(b, "alice"))

        redis_server.stop()
        stopped_at = time.monotonic()
        from_a, from_b = Progress(b, "alice"), Progress(a, "bob")
        assert await wait_for(lambda: _status(eu.server.http_url + "/readyz") == 503, 15)
        started = time.monotonic()
        with pytest.raises(rtc.ConnectError) as refused:
            await _join(eu, room_name, "late")
        assert time.monotonic() - started < 5 and "503" in str(refused.value), refused.value
        assert await wait_until(lambda: from_a.fresh(440, seconds=3) and from_b.fresh(660, seconds=3), 15)
        await asyncio.sleep(max(0.0, 12 - (time.monotonic() - stopped_at)))
        during_a, during_b = Progress(b, "alice"), Progress(a, "bob")
        assert await wait_until(lambda: during_a.fresh(440) and during_b.fresh(660), 10), "media stopped"

        redis_server.start()
        assert await wait_for(lambda: _status(eu.server.http_url + "/readyz") == 200, 20)
        assert await wait_for(lambda: len(cluster.registry()) == len(cluster.media), 10)  # nodes re-registered
        c = await _join(eu, room_name, "carol")
        observers.append(c)
        assert await wait_until(lambda: _audio_ok(c, "alice", 440) and _audio_ok(c, "bob", 660)
                                and _video_ok(c, "alice") and _video_ok(c, "bob"), 25), (
            _describe(c, "alice"), _describe(c, "bob"))
        lk = api.LiveKitAPI(us.server.http_url, KEY, SECRET)
        try:
            listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
            assert sorted(p.identity for p in listed.participants) == ["alice", "bob", "carol"]
        finally:
            await lk.aclose()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await media_a.stop()
        await media_b.stop()
        for obs in observers:
            await obs.close()


def _status(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def test_resume_through_another_signal_node_reaches_the_same_session(cluster, room_name):
    """Stateless edges: the client's signal link breaks and its resume lands on the other signal node; the
    router finds the media node hosting that participant, so the session (sid, tracks, media) carries on."""
    from .proxy import TcpProxy

    eu, us = cluster.signal("eu-west"), cluster.signal("us-east")
    proxy = await TcpProxy(eu.server.port).start()
    alice = Observer("alice")
    bob = await _join(us, room_name, "bob")
    media_a, media_b = DemoMedia(frequency=440), DemoMedia(frequency=660)
    try:
        await alice.connect(proxy.ws_url, join_token(KEY, SECRET, room_name, "alice"))
        await media_a.start(alice.room)
        await media_b.start(bob.room)
        assert await _media_flowing(alice, 440, bob, 660, 25), (_describe(alice, "bob"), _describe(bob, "alice"))
        sid = alice.room.local_participant.sid

        proxy.target = ("127.0.0.1", us.server.port)  # the eu edge is gone for this client
        assert proxy.cut() == 1
        assert await wait_for(lambda: proxy.accepted >= 2 and proxy.open_connections >= 1, 20), "no resume"
        before = alice.received["bob"].frames
        assert await wait_until(lambda: alice.received["bob"].frames > before + 20, 20)
        assert alice.room.local_participant.sid == sid, "the same session, not a new join"
        assert " resumed on SignalLink(" in cluster.logs()
        assert "alice" in {p.identity for p in bob.room.remote_participants.values()}
    finally:
        await media_a.stop()
        await media_b.stop()
        await alice.close()
        await bob.close()
        await proxy.close()
