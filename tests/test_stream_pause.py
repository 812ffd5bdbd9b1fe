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
