"""Subscription permissions (`setTrackSubscriptionPermissions`) with official SDK clients, on one media node and
across media nodes: a subscriber the publisher does not allow receives nothing (counted in decoded frames), one
that loses permission is cut off, and one that is granted it again receives again."""

from __future__ import annotations

import asyncio

import pytest
from livekit import rtc

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .cluster import KEY, SECRET, start_cluster, stop_cluster

pytestmark = pytest.mark.timeout(150)


def _counts(obs: Observer, sender: str) -> tuple[int, int]:
    """(audio frames, video frames) `obs` decoded from `sender` so far."""
    got = obs.received.get(sender)
    return (len(got.samples), got.frames) if got is not None else (0, 0)


def _flowing(obs: Observer, sender: str, since: tuple[int, int], audio: bool = True, video: bool = True) -> bool:
    now = _counts(obs, sender)
    return (not audio or now[0] >= since[0] + 50) and (not video or now[1] >= since[1] + 10)


async def _still(obs: Observer, sender: str, seconds: float) -> tuple[int, int]:
    """How many frames `obs` decoded from `sender` during the next `seconds`."""
    before = _counts(obs, sender)
    await asyncio.sleep(seconds)
    after = _counts(obs, sender)
    return after[0] - before[0], after[1] - before[1]


async def _stops(obs: Observer, sender: str, timeout: float) -> bool:
    """Within `timeout`, a whole second in which `obs` decodes nothing from `sender`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await _still(obs, sender, 1.0) == (0, 0):
            return True
    return False


def _allow(**identities) -> list[rtc.ParticipantTrackPermission]:
    """identity → True (all tracks) or a list of track sids."""
    return [rtc.ParticipantTrackPermission(participant_identity=i, allow_all=v is True,
                                           allowed_track_sids=[] if v is True else list(v))
            for i, v in identities.items()]


async def _scenario(publisher_url: str, viewer_url: str, room: str, key: tuple[str, str] = (KEY, SECRET),
                    placed=None) -> None:
    """alice publishes; bob and carol watch. alice then allows only carol: bob is cut off; dave, joining later,
    never receives anything; bob regains the audio track alone, then everything when alice opens up again."""
    observers: list[Observer] = []

    async def join(identity: str, url: str) -> Observer:
        obs = Observer(identity)
        observers.append(obs)
        await obs.connect(url, join_token(*key, room, identity))
        return obs

    media = DemoMedia(frequency=440)
    try:
        alice = await join("alice", publisher_url)
        bob = await join("bob", viewer_url)
        carol = await join("carol", viewer_url)
        if placed is not None:
            placed()
        await media.start(alice.room)
        audio_sid, video_sid = (pub.sid for pub in media.publications)
        assert await wait_until(lambda: _flowing(bob, "alice", (0, 0)) and _flowing(carol, "alice", (0, 0)), 25), (
            _counts(bob, "alice"), _counts(carol, "alice"))

        # Connection quality reaches the viewers for the publisher they watch too, wherever she is hosted.
        assert await wait_until(lambda: carol.quality_of("alice") == "QUALITY_EXCELLENT"
                                and carol.quality_of("carol") == "QUALITY_EXCELLENT", 15), carol.events

        alice.room.local_participant.set_track_subscription_permissions(
            allow_all_participants=False, participant_permissions=_allow(carol=True))
        assert await _stops(bob, "alice", 10), f"bob still receives alice after losing permission: {bob.events}"
        assert await _still(bob, "alice", 2.0) == (0, 0), "bob still receives alice after losing permission"
        assert _flowing(carol, "alice", _counts(carol, "alice")) or await wait_until(
            lambda: _flowing(carol, "alice", (0, 0)), 1)
        carol_before = _counts(carol, "alice")
        assert await wait_until(lambda: _flowing(carol, "alice", carol_before), 10), "carol, allowed, was cut off"

        dave = await join("dave", viewer_url)
        await asyncio.sleep(3.0)
        assert _counts(dave, "alice") == (0, 0) and not dave.saw("track_subscribed"), dave.events
        assert "alice" in {p.identity for p in dave.room.remote_participants.values()}  # it sees alice, not her media

        alice.room.local_participant.set_track_subscription_permissions(
            allow_all_participants=False, participant_permissions=_allow(carol=True, bob=[audio_sid]))
        bob_before = _counts(bob, "alice")
        assert await wait_until(lambda: _flowing(bob, "alice", bob_before, video=False), 15), _counts(bob, "alice")
        assert _counts(bob, "alice")[1] == bob_before[1], "bob was granted the audio track only"
        assert _counts(dave, "alice") == (0, 0)

        alice.room.local_participant.set_track_subscription_permissions(allow_all_participants=True)
        bob_before = _counts(bob, "alice")
        assert await wait_until(lambda: _flowing(dave, "alice", (0, 0)) and _flowing(bob, "alice", bob_before),
                                20), (_counts(dave, "alice"), _counts(bob, "alice"))
    finally:
        await media.stop()
        for obs in observers:
            await obs.close()


async def test_permissions_on_one_node(dev_server, room_name):
    try:
        await _scenario(dev_server.ws_url, dev_server.ws_url, room_name, (dev_server.api_key, dev_server.api_secret))
    except BaseException:
        print(dev_server.log()[-20000:])
        raise


@pytest.fixture
def two_regions(tmp_path, redis_server):
    c = start_cluster(tmp_path, redis_server)
    yield c
    stop_cluster(c)


async def test_permissions_across_media_nodes(two_regions, room_name):
    """The publisher on the eu-west media node, every subscriber on the us-east one: the permission travels with
    the room events and the subscribing node enforces it (carol, allowed, keeps the relayed tracks)."""
    eu, us = two_regions.signal("eu-west"), two_regions.signal("us-east")
    try:
        def placed() -> None:
            assert two_regions.media_hosting() == {"media-1": 1, "media-2": 2}, two_regions.media_hosting()

        await _scenario(eu.server.ws_url, us.server.ws_url, room_name, placed=placed)
    except BaseException:
        print(two_regions.logs())
        raise
