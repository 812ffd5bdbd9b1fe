"""Simulcast with dynacast across media nodes, as the SDKs send it by default, on a real cluster.

The publisher's node (the origin) pauses only layers nobody watches — its own subscribers or those of other nodes,
whose quality caps reach it over the relay — and relays only the layers they watch. Every process is real: a
private redis-server, a router, signal and media nodes; the client is the official Python SDK.
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


async def relay_rate(node, seconds: float) -> float:
    """Bytes per second the node sends over the relay (its /metrics counter), over `seconds`."""
    before = (await asyncio.to_thread(node.metrics))["braid_relay_bytes_sent_total"]
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = (await asyncio.to_thread(node.metrics))["braid_relay_bytes_sent_total"]
    return (after - before) / (time.monotonic() - started)


def origin_of(cluster, region: str):
    return next(n for n in cluster.media if n.region == region)


async def test_python_sdk_simulcast_with_dynacast_reaches_a_viewer_on_another_node(simulcast_cluster, room_name):
    """The Python SDK publishes 960x540 simulcast with dynacast on (eu node); a viewer on the us node decodes
    continuous frames, drops to the low layer when it asks for LOW and gets the top layer back when it asks for
    HIGH — without a freeze over 1 s at any point. (The SDK's test pattern compresses too well for the relay's
    bytes to tell the layers apart.)"""
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

