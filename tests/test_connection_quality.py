"""Connection quality as the SDKs show it, under real packet loss: an SDK subscriber behind the UDP impairment
relay (tests/impairment.py) starts EXCELLENT, falls to POOR at 10 % loss on its link and recovers when the loss
stops, while the publisher on a clean link stays unaffected."""

from __future__ import annotations

import pytest

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .impairment import Impairment

pytestmark = pytest.mark.timeout(120)


async def test_quality_falls_to_poor_at_ten_percent_loss_and_recovers(impaired_server_factory, room_name):
    server, relay = await impaired_server_factory()
    alice, bob = Observer("alice"), Observer("bob")
    media = DemoMedia(frequency=440)
    try:
        await alice.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "alice"))
        await media.start(alice.room)
        joined = relay.mark()
        await bob.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "bob"))
        assert await wait_until(lambda: (got := bob.received.get("alice")) is not None and got.frames > 10
                                and len(got.samples) > 100, 20)
        assert await wait_until(lambda: bob.quality_of("bob") == "QUALITY_EXCELLENT", 15), bob.events
        assert await wait_until(lambda: bob.quality_of("alice") == "QUALITY_EXCELLENT", 10), bob.events

        bob_flows = relay.flows_since(joined)
        assert bob_flows, relay.flows
        for flow in bob_flows:
            flow.impair(down=Impairment(loss=0.10))
        assert await wait_until(lambda: bob.quality_of("bob") == "QUALITY_POOR", 30), (
            [e for e in bob.events if e[0] == "connection_quality"],
            [(f.port, f.client, f.down.passed, f.down.dropped, f.up.passed) for f in relay.flows.values()])
        assert alice.quality_of("alice") == "QUALITY_EXCELLENT", alice.events  # her own link is clean
        assert bob.quality_of("alice") == "QUALITY_EXCELLENT"  # and bob hears it so

        for flow in bob_flows:
            flow.impair()
        assert await wait_until(lambda: bob.quality_of("bob") in ("QUALITY_GOOD", "QUALITY_EXCELLENT"), 20), (
            bob.events)
        assert await wait_until(lambda: bob.quality_of("bob") == "QUALITY_EXCELLENT", 20), bob.events
    except BaseException:
        print(server.log()[-8000:])
        raise
    finally:
        await media.stop()
        await alice.close()
        await bob.close()
