"""Simulcast with dynacast across media nodes, as the SDKs send it by default, on a real cluster.

The publisher's node (the origin) pauses only layers nobody watches — its own subscribers or those of other nodes,
whose quality caps reach it over the relay — and relays only the layers they watch. Every process is real: a
private redis-server, a router, signal and media nodes; the clients are the official Python SDK and livekit-client
with its defaults (simulcast, dynacast, adaptive stream) in Chromium, on the demo meeting page.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit import rtc

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .cluster import KEY, SECRET, start_cluster, stop_cluster
from .servers import start_redis
from .test_browser import browser, chromium_path, fake_speech  # noqa: F401  (fixtures)
from .test_browser import MeetPage
from .test_browser import wait_until as page_wait

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def simulcast_cluster(tmp_path_factory):
    """Two regions, one media node each: every room spans both when its participants come from both."""
    tmp = tmp_path_factory.mktemp("simulcast-cluster")
    redis = start_redis(tmp)
    cluster = start_cluster(tmp, redis, media_regions=("eu-west", "us-east"), port_base=53000)
    yield cluster
    stop_cluster(cluster)
    redis.stop()


class FrameClock:
    """Samples how many frames a receiver has decoded, to find the longest stretch without a new one."""

    def __init__(self, obs: Observer, sender: str):
        self.obs, self.sender = obs, sender
        self.samples: list[tuple[float, int]] = []

    def frames(self) -> int:
        got = self.obs.received.get(self.sender)
        return got.frames if got else 0

    async def watch(self, seconds: float, interval: float = 0.05) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.samples.append((time.monotonic(), self.frames()))
            await asyncio.sleep(interval)

    def longest_freeze(self) -> float:
        return self.freeze()[0]

    def freeze(self) -> tuple[float, str]:
        """The longest time without a new frame, and when it ended (wall clock, to compare with the logs)."""
        longest, last_change, ended = 0.0, self.samples[0][0], self.samples[0][0]
        for (t0, n0), (t1, n1) in zip(self.samples, self.samples[1:]):
            if n1 != n0:
                if t1 - last_change > longest:
                    longest, ended = t1 - last_change, t1
                last_change = t1
        if self.samples[-1][0] - last_change > longest:
            longest, ended = self.samples[-1][0] - last_change, self.samples[-1][0]
        wall = time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - ended)))
        return longest, wall

    def rate(self) -> float:
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0)


async def relay_rate(node, seconds: float, counter: str = "braid_relay_bytes_sent_total") -> float:
    """Bytes per second the node sends over the relay (a /metrics counter: all, or video only), over `seconds`."""
    before = (await asyncio.to_thread(node.metrics))[counter]
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = (await asyncio.to_thread(node.metrics))[counter]
    return (after - before) / (time.monotonic() - started)


def origin_of(cluster, region: str):
    return next(n for n in cluster.media if n.region == region)


async def test_python_sdk_simulcast_with_dynacast_reaches_a_viewer_on_another_node(simulcast_cluster, room_name):
    """The Python SDK publishes 960x540 simulcast with dynacast on (eu node); a viewer on the us node decodes
    continuous frames, drops to the low layer when it asks for LOW and gets the top layer back when it asks for
    HIGH — without a freeze over 1 s at any point. (The SDK's test pattern compresses too well for the relay's
    bytes to tell the layers apart; the browser test below checks those with Chrome's camera.)"""
    cluster = simulcast_cluster
    eu, us = cluster.signal("eu-west"), cluster.signal("us-east")
    alice, bob = Observer("alice"), Observer("bob")
    media = DemoMedia(width=960, height=540, fps=15, simulcast=True, audio=False)
    try:
        await alice.connect(eu.server.ws_url, join_token(KEY, SECRET, room_name, "alice"), dynacast=True)
        await bob.connect(us.server.ws_url, join_token(KEY, SECRET, room_name, "bob"))
        assert cluster.media_hosting() == {"media-1": 1, "media-2": 1}, cluster.media_hosting()
        await media.start(alice.room)
        clock = FrameClock(bob, "alice")
        assert await wait_until(lambda: clock.frames() >= 15, 20), "no video from alice at bob"
        assert await wait_until(lambda: bob.received["alice"].size == (960, 540), 20), bob.received["alice"].size

        await clock.watch(6)
        assert clock.longest_freeze() < 1.0 and clock.rate() > 10, (clock.longest_freeze(), clock.rate())
        origin = origin_of(cluster, "eu-west")
        high = await relay_rate(origin, 3)

        publication = next(p for p in bob.room.remote_participants["alice"].track_publications.values()
                           if p.kind == rtc.TrackKind.KIND_VIDEO)
        # (The SDK stalls its own frame delivery for a moment while it sends a quality change, whatever the
        # server does: continuity is measured once the new layer shows.)
        publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_LOW)
        assert await wait_until(lambda: bob.received["alice"].size[0] <= 480, 10), bob.received["alice"].size
        low_size = bob.received["alice"].size
        clock.samples.clear()
        await clock.watch(5)
        assert clock.longest_freeze() < 1.0 and clock.rate() > 10, "froze %.2f s (until %s) on the low layer" % (
            clock.freeze())
        low = await relay_rate(origin, 3)

        publication.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_HIGH)
        assert await wait_until(lambda: bob.received["alice"].size == (960, 540), 10), bob.received["alice"].size
        clock.samples.clear()
        await clock.watch(5)
        assert clock.longest_freeze() < 1.0 and clock.rate() > 10, "froze %.2f s (until %s) back on top" % (
            clock.freeze())
        print(f"relay: {high:.0f} B/s high, {low:.0f} B/s low {low_size}")
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await media.stop()
        await alice.close()
        await bob.close()


SVC_SIZES = ((rtc.VideoQuality.VIDEO_QUALITY_LOW, (320, 180)), (rtc.VideoQuality.VIDEO_QUALITY_MEDIUM, (640, 360)),
             (rtc.VideoQuality.VIDEO_QUALITY_HIGH, (1280, 720)))


@pytest.mark.parametrize("codec", ["vp9", "av1"])
async def test_svc_layers_are_chosen_per_viewer_on_each_node(simulcast_cluster, room_name, codec):
    """VP9 and AV1 SVC (L3T3_KEY: one stream carrying 3 spatial layers, as the SDKs publish them): each viewer
    gets the spatial layer its quality asks for, picked out on its own node. A viewer on the other node goes low,
    medium and high again without a freeze over 1 s, while one on the publisher's node keeps the top layer."""
    cluster = simulcast_cluster
    eu, us = cluster.signal("eu-west"), cluster.signal("us-east")
    alice, bob, carol = Observer("alice"), Observer("bob"), Observer("carol")
    media = DemoMedia(width=1280, height=720, fps=15, simulcast=True, codec=codec, audio=False)
    try:
        await alice.connect(eu.server.ws_url, join_token(KEY, SECRET, room_name, "alice"), dynacast=True)
        await bob.connect(us.server.ws_url, join_token(KEY, SECRET, room_name, "bob"))
        await carol.connect(eu.server.ws_url, join_token(KEY, SECRET, room_name, "carol"))
        assert cluster.media_hosting() == {"media-1": 2, "media-2": 1}, cluster.media_hosting()
        await media.start(alice.room)
        for viewer in (bob, carol):
            assert await wait_until(lambda v=viewer: "alice" in v.received and v.received["alice"].size == (
                1280, 720), 30), f"{viewer.identity}: no 720p {codec} from alice"
        publication = next(p for p in bob.room.remote_participants["alice"].track_publications.values()
                           if p.kind == rtc.TrackKind.KIND_VIDEO)
        assert publication.mime_type == f"video/{codec.upper()}"
        for quality, size in SVC_SIZES:
            publication.set_video_quality(quality)
            assert await wait_until(lambda s=size: bob.received["alice"].size == s, 15), (
                quality, bob.received["alice"].size)
            clock = FrameClock(bob, "alice")
            await clock.watch(3)
            assert clock.longest_freeze() < 1.0 and clock.rate() > 8, (size, clock.freeze(), clock.rate())
            assert carol.received["alice"].size == (1280, 720), carol.received["alice"].size
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        await media.stop()
        for viewer in (alice, bob, carol):
            await viewer.close()


# ------------------------------------------------------------------------------------------------
# livekit-client in Chromium, with the SDK's defaults

FREEZE_PROBE = """(identity) => {
  // Every 100 ms: has a new frame from `identity` been decoded? Keeps every wait for one over 1 s (wall clock).
  const probe = {identity, last: Date.now(), frames: 0, gaps: []};
  window.braidFreeze = probe;
  probe.timer = setInterval(async () => {
    const stats = await window.braidMeet.inboundStats();
    const video = stats.find(s => s.identity === probe.identity && s.kind === 'video');
    const now = Date.now();
    if (video && video.framesDecoded > probe.frames) {
      if (now - probe.last > 1000) probe.gaps.push([probe.last, now]);
      probe.last = now;
      probe.frames = video.framesDecoded;
      probe.width = video.frameWidth;
    }
  }, 100);
}"""

FREEZE_READ = """(reset) => {
  const probe = window.braidFreeze;
  const now = Date.now();
  const gaps = now - probe.last > 1000 ? [...probe.gaps, [probe.last, now]] : probe.gaps;
  if (reset) probe.gaps = [];
  return {gaps, frames: probe.frames, width: probe.width};
}"""

ENCODER_PROBE = """() => {
  // Every 200 ms: frames the camera's encoder produced so far, per simulcast layer (wall clock).
  const samples = [];
  window.braidEncoded = samples;
  setInterval(async () => {
    const pub = window.braidRoom.localParticipant.getTrackPublication('camera');
    const report = await pub?.videoTrack?.sender?.getStats();
    const layers = {};
    report?.forEach(s => { if (s.type === 'outbound-rtp') layers[s.rid || ''] = s.framesEncoded || 0; });
    samples.push([Date.now(), layers]);
  }, 200);
}"""


async def server_freezes(viewer: MeetPage, sender: MeetPage, reset: bool) -> tuple[list[str], list[str]]:
    """The viewer's waits over 1 s for a new frame, split by cause: those while the sender's encoder kept
    producing frames at two thirds of its 30 fps on some layer (the server or the network lost them) and those
    while it did not (the publisher's browser starved of CPU, which a 2-core machine running two 720p Chromes can
    be)."""
    seen = await viewer.js(FREEZE_READ, reset)
    encoded = await sender.js("() => window.braidEncoded")
    ours, theirs = [], []
    for start, end in seen["gaps"]:
        before = [layers for t, layers in encoded if t <= start]
        after = [layers for t, layers in encoded if t >= end]
        seconds = (end - start) / 1000
        if not before or not after:
            ours.append(f"{seconds:.2f} s (no encoder samples)")
            continue
        rate = max((after[0].get(rid, 0) - n) / seconds for rid, n in before[-1].items()) if before[-1] else 0
        until = time.strftime("%H:%M:%S", time.localtime(end / 1000))
        (ours if rate >= 20 else theirs).append(f"{seconds:.2f} s until {until} (sender encoding {rate:.0f} fps)")
    return ours, theirs


def token_for(signal_node):
    """The page's token endpoint, as an application serves it: a join token for the cluster's key."""
    def mint(query: dict[str, str]) -> dict:
        token = join_token(KEY, SECRET, query["room"], query.get("identity") or query["name"].lower(),
                           name=query.get("name", ""))
        return {"token": token, "url": signal_node.server.ws_url}
    return mint


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_browsers_on_two_nodes_keep_video_and_a_small_tile_takes_the_low_layer(simulcast_cluster, browser,
                                                                                     room_name):
    """Two pages with livekit-client's defaults (720p simulcast, dynacast, adaptive stream), one per media node,
    decode each other's camera for 30 s with no freeze over 1 s; shrinking Bob's tile of Alice moves the relay to
    her low layer (the origin sends fewer bytes, Bob decodes <= 320 px wide) and video keeps coming; Bob disabling
    her video stops it crossing, enabling it brings it back; asking for 8 fps he gets fewer frames, and all of them
    again asking for 30."""
    cluster = simulcast_cluster
    eu, us = cluster.signal("eu-west"), cluster.signal("us-east")
    alice = await browser.join(eu.server, "Alice", room_name, tokens=token_for(eu))
    bob = await browser.join(us.server, "Bob", room_name, tokens=token_for(us))
    pages = [alice, bob]
    try:
        assert cluster.media_hosting() == {"media-1": 1, "media-2": 1}, cluster.media_hosting()
        alice_id, bob_id = await alice.identity(), await bob.identity()
        for viewer, sender in ((alice, bob_id), (bob, alice_id)):
            await page_wait(lambda: _decoded(viewer, sender, 30), timeout=40,
                            what=f"{viewer.label} to decode 30 frames from {sender}", pages=pages)
        await asyncio.sleep(5)  # both pages have started their cameras and encoders (CPU-bound on 2 cores)
        for viewer, sender in ((alice, bob_id), (bob, alice_id)):
            await viewer.js(FREEZE_PROBE, sender)
            await viewer.js(ENCODER_PROBE)
        await asyncio.sleep(30)
        for viewer, sender in ((alice, bob), (bob, alice)):
            ours, theirs = await server_freezes(viewer, sender, reset=True)
            assert not ours, f"{viewer.label} froze in 30 s while {sender.label} kept sending: {ours}"
            if theirs:
                print(f"{viewer.label} waited while {sender.label}'s encoder stalled: {theirs}")

        origin = next(n for n in cluster.media if n.region == "eu-west")  # Alice's node
        before = await relay_rate(origin, 3)
        await bob.js("(id) => { const tile = document.querySelector(`.tile[data-identity='${id}']`);"
                     " for (const el of [tile, tile.querySelector('video')]) {"
                     " el.style.width = '160px'; el.style.height = '90px'; el.style.flex = 'none'; } }", alice_id)
        low = await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: 0 < s["frameWidth"] <= 320),
                              timeout=20, what="Bob's small tile to get Alice's low layer", pages=pages)
        await asyncio.sleep(4)  # the top layer's last packets and the switch are behind us
        after = await relay_rate(origin, 3)
        assert after < before * 0.5, f"relay from Alice's node: {before:.0f} B/s before, {after:.0f} B/s after"
        more = await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: s["framesDecoded"] >= low[
            "framesDecoded"] + 30), timeout=15, what="frames to keep coming on the low layer", pages=pages)
        assert more["frameWidth"] <= 320, more
        ours, theirs = await server_freezes(bob, alice, reset=False)
        assert not ours, f"Bob froze through the switch while Alice kept sending: {ours} ({theirs})"

        # Bob turns Alice's video off (track_setting disabled): no layer of it crosses; on again, it comes back.
        await bob.js(_SET_ENABLED, [alice_id, False])
        await asyncio.sleep(2)
        disabled = await relay_rate(origin, 3, "braid_relay_video_bytes_sent_total")  # her audio still crosses
        assert disabled < 1000, f"relay {disabled:.0f} B/s of video with Alice's video disabled at Bob ({after:.0f})"
        frames = (await _decoded(bob, alice_id, 0))["framesDecoded"]
        await bob.js(_SET_ENABLED, [alice_id, True])
        await page_wait(lambda: _decoded(bob, alice_id, frames + 30), timeout=15,
                        what="Alice's video to come back at Bob", pages=pages)
        print(f"relay from Alice's node: {before:.0f} B/s with a full tile, {after:.0f} B/s with a small one, "
              f"{disabled:.0f} B/s of video with her video disabled")

        # Bob asks for 8 fps (setVideoFPS): his node leaves out the upper temporal layers of her VP8 simulcast
        # layer (libwebrtc sends three), then sends every picture again when he asks for 30, without a freeze.
        await asyncio.sleep(2)
        full_rate = await _decode_rate(bob, alice_id)
        await bob.js(FREEZE_PROBE, alice_id)
        await bob.js(_SET_FPS, [alice_id, 8])
        await asyncio.sleep(2)
        few_rate = await _decode_rate(bob, alice_id)
        await bob.js(_SET_FPS, [alice_id, 30])
        await asyncio.sleep(2)
        back_rate = await _decode_rate(bob, alice_id)
        print(f"VP8 at Bob: {full_rate:.0f} fps, {few_rate:.0f} fps asking 8, {back_rate:.0f} fps asking 30")
        assert 2 < few_rate < 0.7 * full_rate and back_rate > 0.8 * full_rate, (full_rate, few_rate, back_rate)
        ours, theirs = await server_freezes(bob, alice, reset=False)
        assert not ours, f"Bob froze with fewer temporal layers while Alice kept sending: {ours} ({theirs})"
    except BaseException:
        print(cluster.logs())
        raise


_SET_ENABLED = """([identity, on]) => {
  const participant = window.braidRoom.remoteParticipants.get(identity);
  participant.getTrackPublication('camera').setEnabled(on);
}"""


async def _decoded_if(viewer: MeetPage, identity: str, cond) -> dict | None:
    stats = next((s for s in await viewer.inbound() if s["identity"] == identity and s["kind"] == "video"), None)
    return stats if stats and cond(stats) else None


async def _decoded(viewer: MeetPage, identity: str, frames: int) -> dict | None:
    return await _decoded_if(viewer, identity, lambda s: s["framesDecoded"] >= frames)


_SET_QUALITY = "([identity, quality]) => window.braidMeet.setVideoQuality(identity, quality)"
_SET_FPS = """([identity, fps]) => {
  window.braidRoom.remoteParticipants.get(identity).getTrackPublication('camera').setVideoFPS(fps);
}"""


async def _decode_rate(viewer: MeetPage, identity: str, seconds: float = 3.0) -> float:
    before = (await _decoded_if(viewer, identity, lambda s: True))["framesDecoded"]
    await asyncio.sleep(seconds)
    return ((await _decoded_if(viewer, identity, lambda s: True))["framesDecoded"] - before) / seconds
_MIME = "(identity) => window.braidRoom.remoteParticipants.get(identity)?.getTrackPublication('camera')?.mimeType"


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("codec", ["vp9", "av1"])
async def test_browser_svc_reaches_a_browser_on_another_node_at_each_spatial_layer(simulcast_cluster, browser,
                                                                                   room_name, codec):
    """livekit-client in Chromium publishes its camera in VP9 or AV1 (with the SDK's SVC default, L3T3_KEY); a browser on the
    other media node decodes it, takes the low spatial layer when it asks for LOW and a layer at least twice as
    wide when it asks for HIGH, without a freeze over 1 s while the publisher's encoder keeps going; asking for
    8 fps (setVideoFPS) it decodes fewer frames: the server drops temporal layers."""
    cluster = simulcast_cluster
    eu, us = cluster.signal("eu-west"), cluster.signal("us-east")
    alice = await browser.join(eu.server, "Alice", room_name, query=f"codec={codec}", tokens=token_for(eu))
    bob = await browser.join(us.server, "Bob", room_name, query="adaptive=0&res=180", tokens=token_for(us))
    pages = [alice, bob]
    try:
        alice_id = await alice.identity()
        await page_wait(lambda: _decoded(bob, alice_id, 30), timeout=40, what=f"Bob to decode Alice's {codec}",
                        pages=pages)
        assert (await bob.js(_MIME, alice_id)).lower() == f"video/{codec}"
        await bob.js(FREEZE_PROBE, alice_id)
        await alice.js(ENCODER_PROBE)
        await bob.js(_SET_QUALITY, [alice_id, "low"])
        low = await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: 0 < s["frameWidth"] <= 320),
                              timeout=20, what="Bob to get Alice's low spatial layer", pages=pages)
        await page_wait(lambda: _decoded(bob, alice_id, low["framesDecoded"] + 30), timeout=15,
                        what="frames to keep coming on the low layer", pages=pages)
        await bob.js(_SET_QUALITY, [alice_id, "high"])
        high = await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: s["frameWidth"] >= 2 * low[
            "frameWidth"]), timeout=20, what="Bob to get a higher spatial layer of Alice's", pages=pages)
        await page_wait(lambda: _decoded(bob, alice_id, high["framesDecoded"] + 30), timeout=15,
                        what="frames to keep coming on the high layer", pages=pages)
        ours, theirs = await server_freezes(bob, alice, reset=False)
        assert not ours, f"Bob froze while Alice kept sending: {ours} ({theirs})"
        full_rate = await _decode_rate(bob, alice_id)
        await bob.js(_SET_FPS, [alice_id, 8])  # livekit-client's setVideoFPS: fewer temporal layers
        await asyncio.sleep(2)
        few_rate = await _decode_rate(bob, alice_id)
        assert 2 < few_rate < 0.6 * full_rate, (full_rate, few_rate)
        print(f"{codec} SVC at Bob: {low['frameWidth']}x{low['frameHeight']} low, "
              f"{high['frameWidth']}x{high['frameHeight']} high, {full_rate:.0f} fps, {few_rate:.0f} fps asking 8")
    except BaseException:
        print(cluster.logs())
        raise
