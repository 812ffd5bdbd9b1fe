"""Official LiveKit Python SDK clients against `braid-server --dev` as a real process: audio, video and data.

A publishes a 440 Hz sine and the quadrant pattern; B publishes 660 Hz and the same pattern. Each must receive
the other's audio at the right dominant frequency and video frames of the published size and content.
"""

from __future__ import annotations

import asyncio

import pytest
from livekit import rtc

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia, dominant_frequency, pattern_matches

pytestmark = pytest.mark.timeout(120)


def _token(server, room: str, identity: str, **grants) -> str:
    return join_token(server.api_key, server.api_secret, room, identity, **grants)


async def _join(server, room: str, identity: str, **grants) -> Observer:
    obs = Observer(identity)
    await obs.connect(server.ws_url, _token(server, room, identity, **grants))
    return obs


def _audio_ok(obs: Observer, sender: str, freq: float) -> bool:
    got = obs.received.get(sender)
    if got is None:
        return False
    samples = got.audio()
    return len(samples) >= 48000 and abs(dominant_frequency(samples[-48000:]) - freq) < 8


def _video_ok(obs: Observer, sender: str, size=(320, 240)) -> bool:
    got = obs.received.get(sender)
    return bool(got and got.frames >= 10 and got.size == size and pattern_matches(got.last_frame))


async def _exchange(server, room: str) -> None:
    """Two clients publish; each receives the other's media; reliable and lossy data flow both ways."""
    a = await _join(server, room, "alice")
    b = await _join(server, room, "bob")
    media_a, media_b = DemoMedia(frequency=440), DemoMedia(frequency=660)
    try:
        await media_a.start(a.room)
        await media_b.start(b.room)
        assert await wait_until(lambda: _audio_ok(b, "alice", 440) and _audio_ok(a, "bob", 660), 20), (
            f"audio: bob got {len(b.received.get('alice', _Empty()).samples)} frames, "
            f"alice got {len(a.received.get('bob', _Empty()).samples)}"
        )
        assert await wait_until(lambda: _video_ok(b, "alice") and _video_ok(a, "bob"), 20), (
            _describe(b, "alice"), _describe(a, "bob"))
        assert await wait_until(lambda: any("alice" in d.split(",") for e, d in b.events if e == "speakers"), 10)

        await a.room.local_participant.publish_data(b"reliable-from-a", reliable=True, topic="t")
        await a.room.local_participant.publish_data(b"lossy-from-a", reliable=False)
        await b.room.local_participant.publish_data(b"reliable-from-b", reliable=True)
        assert await wait_until(lambda: {p.data for p in b.data} >= {b"reliable-from-a", b"lossy-from-a"}, 10), (
            [p.data for p in b.data])
        assert await wait_until(lambda: any(p.data == b"reliable-from-b" for p in a.data), 10)
        packet = next(p for p in b.data if p.data == b"reliable-from-a")
        assert packet.participant is not None and packet.participant.identity == "alice"
        assert packet.kind == rtc.DataPacketKind.KIND_RELIABLE and packet.topic == "t"
    finally:
        await media_a.stop()
        await media_b.stop()
        await a.close()
        await b.close()


def _describe(obs: Observer, sender: str) -> str:
    got = obs.received.get(sender)
    if got is None:
        return f"{obs.identity} got nothing from {sender}; events {obs.events}"
    matches = pattern_matches(got.last_frame) if got.last_frame is not None else None
    return f"{obs.identity} from {sender}: {got.frames} frames of {got.size}, pattern {matches}"


class _Empty:
    samples: list = []


async def test_v1_two_clients_exchange_audio_video_and_data(dev_server, webhook_sink, room_name):
    await _exchange(dev_server, room_name)

    def names() -> list[str]:
        return [d.event["event"] for d in webhook_sink.for_room(room_name)]

    assert await wait_until(lambda: names().count("participant_left") == 2, 15), names()
    events = names()
    assert events.count("participant_joined") == 2 and events.count("track_published") == 4, events
    assert events.index("participant_joined") < events.index("participant_left")


async def test_v0_dual_pc_when_v1_is_off(server_factory, room_name):
    server = server_factory(env={"BRAID_RTC__ENABLE_V1": "false"})
    await _exchange(server, room_name)


async def test_destinations_unpublish_mute_and_leave(dev_server, room_name):
    a = await _join(dev_server, room_name, "a")
    b = await _join(dev_server, room_name, "b")
    c = await _join(dev_server, room_name, "c")
    media = DemoMedia(frequency=440)
    try:
        await a.room.local_participant.publish_data(b"only-for-c", reliable=True, destination_identities=["c"])
        await a.room.local_participant.publish_data(b"for-all", reliable=True)
        assert await wait_until(lambda: any(p.data == b"for-all" for p in b.data), 10)
        assert await wait_until(lambda: any(p.data == b"only-for-c" for p in c.data), 10)
        assert not any(p.data == b"only-for-c" for p in b.data)

        await media.start(a.room)
        audio_pub, video_pub = media.publications
        assert await wait_until(lambda: _audio_ok(b, "a", 440), 20)

        await a.room.local_participant.unpublish_track(video_pub.sid)
        assert await wait_until(lambda: b.saw("track_unpublished", video_pub.sid), 10)

        audio_pub.track.mute()
        assert await wait_until(lambda: b.saw("track_muted", audio_pub.sid), 10)
        audio_pub.track.unmute()
        assert await wait_until(lambda: b.saw("track_unmuted", audio_pub.sid), 10)

        await media.stop()
        await a.close()
        assert await wait_until(lambda: b.saw("participant_disconnected", "a") and c.saw(
            "participant_disconnected", "a"), 10)
    finally:
        await media.stop()
        for obs in (a, b, c):
            await obs.close()


CRASHER = """
import asyncio, sys
from braid.clients.harness import Observer
from braid.clients.media import DemoMedia

async def main():
    obs = Observer("crasher")
    await obs.connect(sys.argv[1], sys.argv[2])
    await DemoMedia(video=False).start(obs.room)
    print("joined", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_participant_whose_process_dies_is_removed(dev_server, room_name):
    import subprocess
    import sys
    import time

    b = await _join(dev_server, room_name, "watcher")
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, dev_server.ws_url, _token(dev_server, room_name, "crasher")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert await asyncio.to_thread(proc.stdout.readline) == b"joined\n"
        assert await wait_until(lambda: b.received.get("crasher") is not None and
                                len(b.received["crasher"].samples) > 20, 15)
        proc.kill()
        killed_at = time.monotonic()
        assert await wait_until(lambda: b.saw("participant_disconnected", "crasher"), 25)
        assert time.monotonic() - killed_at < 20
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        await b.close()
