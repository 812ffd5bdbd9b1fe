"""Audio on lossy links with official SDK clients: a publisher's RED reaches subscribers that negotiate it, NACK
works for audio both ways, and together they conceal 5 % loss on a subscriber's link (its own receive statistics);
a subscriber that takes plain Opus only (v0, where the node offers one codec) gets the primary Opus frames."""

from __future__ import annotations

import asyncio

import pytest
from livekit import rtc

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia, dominant_frequency

from .impairment import Impairment

pytestmark = pytest.mark.timeout(120)


def _tone_ok(obs: Observer, sender: str, freq: float) -> bool:
    got = obs.received.get(sender)
    if got is None:
        return False
    samples = got.audio()
    return len(samples) >= 48000 and abs(dominant_frequency(samples[-48000:]) - freq) < 8


async def _audio_stats(obs: Observer, sender: str) -> dict[str, int]:
    participant = next(p for p in obs.room.remote_participants.values() if p.identity == sender)
    pub = next(p for p in participant.track_publications.values() if p.kind == rtc.TrackKind.KIND_AUDIO)
    for stat in await pub.track.get_stats():
        if stat.WhichOneof("stats") == "inbound_rtp":
            s = stat.inbound_rtp
            return {"received": s.received.packets_received, "lost": s.received.packets_lost,
                    "nacks": s.inbound.nack_count, "samples": s.inbound.total_samples_received,
                    "concealed": s.inbound.concealed_samples - s.inbound.silent_concealed_samples}
    raise AssertionError("no inbound-rtp stats")


async def _session(server, room: str):
    alice, bob = Observer("alice"), Observer("bob")
    media = DemoMedia(frequency=440, video=False)
    await alice.connect(server.ws_url, join_token(server.api_key, server.api_secret, room, "alice"))
    await media.start(alice.room)
    return alice, bob, media


async def test_red_and_nack_conceal_five_percent_loss(impaired_server_factory, room_name):
    server, relay = await impaired_server_factory()
    alice, bob, media = await _session(server, room_name)
    try:
        joined = relay.mark()
        await bob.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "bob"))
        assert await wait_until(lambda: _tone_ok(bob, "alice", 440), 20)
        pub = next(iter(next(iter(bob.room.remote_participants.values())).track_publications.values()))
        assert pub.mime_type == "audio/red", pub.mime_type  # the publisher's RED is kept

        flows = relay.flows_since(joined)
        for flow in flows:
            flow.impair(down=Impairment(loss=0.05))
        link_before = sum(f.down.dropped for f in flows), sum(f.down.passed for f in flows)
        before = await _audio_stats(bob, "alice")
        await asyncio.sleep(8)
        after = await _audio_stats(bob, "alice")
        delta = {k: after[k] - before[k] for k in after}
        dropped = sum(f.down.dropped for f in flows) - link_before[0]
        passed = sum(f.down.passed for f in flows) - link_before[1]
        lost = dropped / max(1, dropped + passed)
        assert dropped > 10 and lost > 0.03, (dropped, passed)  # the link really lost packets
        assert delta["nacks"] > 0, delta  # and the subscriber asked for them again
        concealed = delta["concealed"] / max(1, delta["samples"])
        assert concealed < lost / 2, (delta, lost)  # unrepaired, at least as much would be concealed as was lost
        assert _tone_ok(bob, "alice", 440)
    except BaseException:
        print(server.log()[-6000:])
        raise
    finally:
        await media.stop()
        await alice.close()
        await bob.close()


async def test_plain_opus_for_a_subscriber_without_red(impaired_server_factory, room_name):
    server, _ = await impaired_server_factory({"BRAID_RTC__ENABLE_V1": "false"})
    alice, bob, media = await _session(server, room_name)
    try:
        await bob.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "bob"))
        assert await wait_until(lambda: _tone_ok(bob, "alice", 440), 20), server.log()[-4000:]
    finally:
        await media.stop()
        await alice.close()
        await bob.close()
