"""Connection quality as the SDKs show it, under real packet loss: an SDK subscriber behind the UDP impairment
relay (tests/impairment.py) starts EXCELLENT, falls to POOR at 10 % loss on its link and recovers when the loss
stops, while the publisher on a clean link stays unaffected."""

from __future__ import annotations

import asyncio
import socket

import pytest

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

from .impairment import Impairment, UdpImpairmentRelay

pytestmark = pytest.mark.timeout(120)

RELAY_IP = "127.0.0.2"  # what the media node announces; it listens on 127.0.0.1
PORTS = 12


def _free_block(count: int) -> range:
    """`count` consecutive UDP ports free on both loopback addresses."""
    import random

    for _ in range(200):
        start = random.randint(20000, 39000)
        socks = []
        try:
            for port in range(start, start + count):
                for host in ("127.0.0.1", RELAY_IP):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(s)
                    s.bind((host, port))
            return range(start, start + count)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port block")


@pytest.fixture
async def impaired_server(server_factory):
    """A dev server whose media ports are reached only through an impairment relay."""
    ports = _free_block(PORTS)
    server = server_factory(env={"BRAID_RTC__NODE_IP": RELAY_IP, "BRAID_RTC__BIND_IP": "127.0.0.1",
                                 "BRAID_RTC__PORT_RANGE_START": str(ports.start),
                                 "BRAID_RTC__PORT_RANGE_END": str(ports.stop - 1)})
    relay = await UdpImpairmentRelay(RELAY_IP, "127.0.0.1", ports).start()
    yield server, relay
    relay.close()


async def test_quality_falls_to_poor_at_ten_percent_loss_and_recovers(impaired_server, room_name):
    server, relay = impaired_server
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
        assert await wait_until(lambda: bob.quality_of("bob") == "QUALITY_POOR", 20), bob.events
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
