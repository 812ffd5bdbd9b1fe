"""Bandwidth estimation on both legs, through the UDP impairment relay (tests/impairment.py), with browsers running
livekit-client's defaults.

Publisher leg: the media node answers transport-wide feedback (twcc.py), so the publishing browser's own
estimator sees its uplink. Before it did, a browser whose uplink was squeezed to 250 kbit/s went on estimating
1.3-5.5 Mbit/s, kept its middle layer going into the bottleneck and saw one-second round trips.

Subscriber leg: the node numbers what it sends transport-wide and estimates each subscriber's downlink from the
feedback (bwe.py), and fits the streams into it (allocation.py). Before, only receiver-report loss moved a
subscriber down: on a link with a deep queue (250 kbit/s, 3 s of buffer) loss came late, the queue stayed full
for ten seconds and the picture froze for fourteen.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiortc.rtcdtlstransport import RTCCertificate

from benchmarks.rawclient import start_publisher
from braid.clients.harness import join_token
from braid.services.media.ice import PortRange

from .impairment import Impairment, free_port_block
from .test_cluster_simulcast import ENCODER_PROBE, FREEZE_PROBE, _decoded_if, server_freezes
from .test_browser import browser, chromium_path, fake_speech  # noqa: F401 (fixtures)
from .test_browser import wait_until as page_wait

pytestmark = pytest.mark.timeout(180)

_PUBLISHER_STATS = """async () => {
  const pub = window.braidRoom.localParticipant.getTrackPublication('camera');
  const report = await pub?.videoTrack?.sender?.getStats();
  const out = {layers: {}, available: null, rtt: null};
  report?.forEach(s => {
    if (s.type === 'outbound-rtp') out.layers[s.rid || ''] = {bytes: s.bytesSent, limit: s.qualityLimitationReason};
    if (s.type === 'candidate-pair' && s.nominated) {
      out.available = s.availableOutgoingBitrate ?? null;
      out.rtt = s.currentRoundTripTime ?? null;
    }
  });
  return out;
}"""


async def _layer_rates(page, seconds: float = 2.0) -> dict[str, float]:
    before = await page.js(_PUBLISHER_STATS)
    await asyncio.sleep(seconds)
    after = await page.js(_PUBLISHER_STATS)
    return {rid: (layer["bytes"] - before["layers"].get(rid, {"bytes": 0})["bytes"]) * 8 / seconds
            for rid, layer in after["layers"].items()}


@pytest.mark.slow
async def test_a_browser_publisher_on_a_squeezed_uplink_estimates_it_and_recovers(impaired_server_factory,
                                                                                   browser, room_name):  # noqa: F811
    """Alice publishes her camera (simulcast) to Bob; her uplink is capped at 250 kbit/s. From the server's
    transport-wide feedback her browser estimates the link within seconds, says its layers are limited by
    bandwidth and sends under the cap; once the cap is lifted its estimate climbs back and the middle layer
    returns."""
    server, relay = await impaired_server_factory()
    joined = relay.mark()
    alice = await browser.join(server, "Alice", room_name)
    await asyncio.sleep(1)
    flows = relay.flows_since(joined)
    assert flows, relay.flows
    bob = await browser.join(server, "Bob", room_name)
    pages = [alice, bob]
    try:
        await page_wait(lambda: _sending(alice, "h"), timeout=30, what="Alice to send her middle layer", pages=pages)
        for flow in flows:
            flow.impair(up=Impairment(rate_bps=250_000))
        squeezed = await page_wait(lambda: _estimated_below(alice, 300_000), timeout=10,
                                   what="Alice's browser to estimate her squeezed uplink", pages=pages)
        assert any(layer["limit"] == "bandwidth" for layer in squeezed["layers"].values()), squeezed
        await asyncio.sleep(3)
        rates = await _layer_rates(alice)
        assert sum(rates.values()) < 250_000, rates
        for flow in flows:
            flow.impair()
        recovered = await page_wait(lambda: _sending(alice, "h"), timeout=40,
                                    what="Alice's middle layer back once the cap is lifted", pages=pages)
        print(f"Alice estimated {squeezed['available'] / 1000:.0f} kbit/s at a 250 kbit/s cap, sent "
              f"{sum(rates.values()) / 1000:.0f} kbit/s ({ {k: round(v / 1000) for k, v in rates.items()} }), "
              f"then {recovered['available'] / 1000:.0f} kbit/s uncapped")
    except BaseException:
        print(server.log()[-6000:])
        raise


async def _sending(page, rid: str) -> dict | None:
    rates = await _layer_rates(page, 1.0)
    return await page.js(_PUBLISHER_STATS) if rates.get(rid, 0) > 50_000 else None


async def _estimated_below(page, bps: float) -> dict | None:
    stats = await page.js(_PUBLISHER_STATS)
    return stats if stats["available"] is not None and stats["available"] < bps else None


@pytest.mark.slow
async def test_a_browser_behind_a_deep_queue_is_moved_down_before_it_freezes(impaired_server_factory,
                                                                            browser, room_name):  # noqa: F811
    """Bob's downlink is capped at 250 kbit/s behind a 100 kB buffer, which drops nothing for seconds. He is moved
    to the low layer, the buffer drains, then his video goes on with no freeze over 1 s while Alice's encoder keeps
    going; with the cap lifted he climbs back. Which signal moves him is printed, not asserted: the queue in the
    feedback usually acts within 3-5 s, but on a loaded 2-core machine it sometimes misses, and receiver-report
    loss acts once the buffer overflows (how long he stalls before the buffer drains depends on which)."""
    server, relay = await impaired_server_factory()
    alice = await browser.join(server, "Alice", room_name)
    joined = relay.mark()
    bob = await browser.join(server, "Bob", room_name)
    pages = [alice, bob]
    try:
        alice_id = await alice.identity()
        await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: s["frameWidth"] >= 640), timeout=40,
                        what="Bob to decode Alice's top layers", pages=pages)
        flows = relay.flows_since(joined)
        assert flows, relay.flows
        await bob.js(FREEZE_PROBE, alice_id)
        await alice.js(ENCODER_PROBE)
        capped_at = asyncio.get_running_loop().time()
        for flow in flows:
            flow.impair(down=Impairment(rate_bps=250_000, queue_bytes=100_000))
        await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: 0 < s["frameWidth"] <= 320), timeout=30,
                        what="Bob moved to the layer his link carries", pages=pages)
        moved_after = asyncio.get_running_loop().time() - capped_at
        by = "the estimate" if "to fit the subscriber's bandwidth estimate" in server.log() else "receiver reports"
        deadline = asyncio.get_running_loop().time() + 30
        while (queued := max(flow.down.backlog() for flow in flows)) >= 0.5:
            assert asyncio.get_running_loop().time() < deadline, f"{queued:.1f} s still queued for Bob"
            await asyncio.sleep(0.25)
        drained_after = asyncio.get_running_loop().time() - capped_at
        await server_freezes(bob, alice, reset=True)  # what the full buffer held up before it drained
        await asyncio.sleep(8)
        ours, theirs = await server_freezes(bob, alice, reset=True)
        assert not ours, f"Bob froze on the low layer while Alice kept sending: {ours} ({theirs})"
        for flow in flows:
            flow.impair()
        await page_wait(lambda: _decoded_if(bob, alice_id, lambda s: s["frameWidth"] > 320), timeout=40,
                        what="Bob back on a higher layer once the cap is gone", pages=pages)
        print(f"Bob moved down {moved_after:.1f} s after the cap (by {by}), the buffer drained {drained_after:.1f} s "
              "after it")
    except BaseException:
        print(server.log()[-8000:])
        raise


async def _remb_until(publisher, condition, timeout: float, what: str) -> list[int]:
    """Wait until `condition` holds for the REMB values the node sent since this call; returns them."""
    since = time.monotonic()
    deadline = since + timeout
    while True:
        values = [bps for at, bps in publisher.remb if at >= since]
        if values and condition(values):
            return values
        assert time.monotonic() < deadline, f"{what}: REMB since then {values}"
        await asyncio.sleep(0.25)


async def test_a_publisher_without_transport_cc_is_told_its_squeezed_uplink_by_remb(impaired_server_factory,
                                                                                    room_name):
    """A publisher that numbers nothing transport-wide (aiortc, older clients) learns its uplink only from the
    REMB the node sends. It sends 1.6 Mbit/s of video: uncapped the REMB stays above that; capped at 500 kbit/s
    the REMB falls under the cap within seconds, so an encoder would back off; once the cap is lifted it climbs
    back over what is sent. Real ICE, DTLS and SRTP through the impairment relay."""
    server, relay = await impaired_server_factory()
    cert = RTCCertificate.generateCertificate()
    client_ports = free_port_block(4, hosts=("127.0.0.1",))
    clients: list = []
    joined = relay.mark()
    sender = await start_publisher(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "pub"),
                                   PortRange(client_ports.start, client_ports.stop - 1, host="127.0.0.1"), cert,
                                   30, 6, clients, transport_cc=False)
    publisher = clients[0]
    try:
        assert publisher.pc.twcc is None  # nothing numbered: the node estimates from arrivals and RTP timestamps
        await _remb_until(publisher, lambda v: max(v) >= 1_300_000, 15, "REMB above what is sent, uncapped")
        (flow,) = relay.flows_since(joined)
        flow.impair(up=Impairment(rate_bps=500_000))
        squeezed = await _remb_until(publisher, lambda v: min(v) <= 600_000, 10, "REMB under the 500 kbit/s cap")
        flow.impair()
        await _remb_until(publisher, lambda v: v[-1] >= 1_200_000, 30, "REMB back over 1.2 Mbit/s uncapped")
        print(f"REMB while capped: {squeezed}")
    finally:
        await sender.stop()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    assert "Traceback" not in server.log(), server.log()[-3000:]
