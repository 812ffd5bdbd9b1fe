"""A subscriber whose link cannot carry a video stream at all (a bandwidth cap far below even its lowest layer,
through the UDP impairment relay of tests/impairment.py) has the stream paused, as LiveKit's allocator pauses it:
the server stops sending the video (its audio goes on), tells the subscriber (`stream_state_update`), and once the
link is back resumes the video on a keyframe."""

from __future__ import annotations

import asyncio

import pytest

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .impairment import Impairment
from .test_browser import browser, chromium_path, fake_speech  # noqa: F401 (fixtures)
from .test_browser import wait_until as page_wait

pytestmark = pytest.mark.timeout(150)

PAUSED = "paused: its link cannot carry it"


async def test_video_a_link_cannot_carry_is_paused_and_resumed(impaired_server_factory, room_name):
    server, relay = await impaired_server_factory()
    alice, bob = Observer("alice"), Observer("bob")
    media = DemoMedia(frequency=440, width=640, height=360, fps=30)
    try:
        await alice.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "alice"))
        await media.start(alice.room)
        joined = relay.mark()
        await bob.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "bob"))
        got = None
        assert await wait_until(lambda: (got := bob.received.get("alice")) is not None and got.frames > 30, 20)
        got = bob.received["alice"]
        flows = relay.flows_since(joined)
        assert flows, relay.flows
        for flow in flows:
            flow.impair(down=Impairment(rate_bps=60_000, queue_bytes=6_000))
        assert await wait_until(lambda: PAUSED in server.log(), 30), server.log()[-3000:]
        await asyncio.sleep(1.5)  # what was queued in the relay drains
        frames, samples = got.frames, len(got.audio())
        await asyncio.sleep(2)
        assert got.frames <= frames + 2, "video still arrives while paused"
        assert len(got.audio()) > samples + 48000, "audio must go on while the video is paused"

        for flow in flows:
            flow.impair()
        assert await wait_until(lambda: " resumed" in server.log().split(PAUSED, 1)[1], 40), server.log()[-4000:]
        resumed_at = got.frames
        assert await wait_until(lambda: got.frames > resumed_at + 30, 15), "video did not come back"
    except BaseException:
        print(server.log()[-8000:])
        raise
    finally:
        await media.stop()
        await alice.close()
        await bob.close()


_STREAM_STATE = """([identity]) => {
  const participant = window.braidRoom.remoteParticipants.get(identity);
  const publication = participant && [...participant.videoTrackPublications.values()][0];
  return publication && publication.track ? publication.track.streamState : null;
}"""


@pytest.mark.slow
async def test_a_browser_sees_the_stream_paused_and_active_again(impaired_server_factory, browser,  # noqa: F811
                                                                 room_name):
    """livekit-client's own stream state (TrackStreamStateChanged) follows the server's pause and resume."""
    server, relay = await impaired_server_factory()
    alice = Observer("alice")
    media = DemoMedia(frequency=440, width=640, height=360, fps=30)
    try:
        await alice.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "alice"))
        await media.start(alice.room)
        joined = relay.mark()
        page = await browser.join(server, "Bob", room_name)
        assert await page_wait(lambda: _active(page), timeout=20, what="Alice's video at Bob", pages=[page])
        flows = relay.flows_since(joined)
        for flow in flows:
            flow.impair(down=Impairment(rate_bps=60_000, queue_bytes=6_000))
        await page_wait(lambda: _state_is(page, "paused"), timeout=30, what="the stream paused at Bob",
                        pages=[page])
        for flow in flows:
            flow.impair()
        await page_wait(lambda: _state_is(page, "active"), timeout=40, what="the stream active again at Bob",
                        pages=[page])
    except BaseException:
        print(server.log()[-8000:])
        raise
    finally:
        await media.stop()
        await alice.close()


async def _active(page) -> bool:
    return await _state_is(page, "active")


async def _state_is(page, state: str) -> bool:
    return await page.js(_STREAM_STATE, ["alice"]) == state
