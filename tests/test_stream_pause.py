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
from .test_cluster_simulcast import ENCODER_PROBE, FREEZE_PROBE, _decoded_if, server_freezes
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


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_browser_on_a_300_kbit_link_gets_a_layer_that_fits_and_recovers(impaired_server_factory,  # noqa: F811
                                                                                browser, room_name):
    """Two browsers with livekit-client's defaults (720p simulcast camera, microphone); Bob's downlink is squeezed
    to 300 kbit/s. The server moves him to a layer the link carries, on which his video then runs with no freeze
    over 1 s while Alice's encoder keeps going; once the cap is lifted he climbs back to a higher layer."""
    server, relay = await impaired_server_factory()
    alice = await browser.join(server, "Alice", room_name)
    joined = relay.mark()
    bob = await browser.join(server, "Bob", room_name)
    pages = [alice, bob]
    try:
        alice_id = await alice.identity()
        top = await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: s["frameWidth"] >= 640), timeout=40,
                              what="Bob to decode Alice's top layers", pages=pages)
        flows = relay.flows_since(joined)
        assert flows, relay.flows
        for flow in flows:
            flow.impair(down=Impairment(rate_bps=300_000))
        low = await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: 0 < s["frameWidth"] <= 320),
                              timeout=30, what="Bob to be moved to the layer his link carries", pages=pages)
        await asyncio.sleep(3)  # what queued at the cap before the switch has drained
        await bob.js(FREEZE_PROBE, alice_id)
        await alice.js(ENCODER_PROBE)
        await asyncio.sleep(15)
        ours, theirs = await server_freezes(bob, alice, reset=True)
        assert not ours, f"Bob froze on the squeezed link while Alice kept sending: {ours} ({theirs})"
        settled = await _decoded_if(bob, alice_id, lambda s: True)
        assert settled["framesDecoded"] > low["framesDecoded"] + 150, (low, settled)  # ~10 fps or more
        assert settled["frameWidth"] <= 320, settled

        for flow in flows:
            flow.impair()
        back = await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: s["frameWidth"] > 320), timeout=40,
                               what="Bob back on a higher layer once the cap is gone", pages=pages)
        adaptation = [line.split(" forward: ", 1)[-1] for line in server.log().splitlines()
                      if "quality cap" in line or "probing" in line]
        print(f"Bob: {top['frameWidth']} px wide, {low['frameWidth']} px at 300 kbit/s, {back['frameWidth']} px "
              "after:\n  " + "\n  ".join(adaptation))
    except BaseException:
        print(server.log()[-8000:])
        raise
