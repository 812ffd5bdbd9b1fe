"""Browsers behind networks that allow only TURN (issue 11): headless Chromium running livekit-client with
`rtcConfig.iceTransportPolicy = 'relay'` (the meeting page's `?relay=1`) joins through coturn over UDP, TCP and TLS,
and each page decodes the other's camera. coturn's TLS certificate is self-signed, so Chromium is told to accept it.
"""

from __future__ import annotations

import pytest

from .servers import TurnProcess, start_server, start_turn
from .test_browser import (  # noqa: F401
    chromium_path, fake_speech, launch_browser, selected_candidates, wait_video_flowing)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.fixture(scope="module")
def turn(tmp_path_factory) -> TurnProcess:
    server = start_turn(tmp_path_factory.mktemp("coturn-browser"))
    yield server
    server.stop()


@pytest.fixture
async def relay_browser(chromium_path, fake_speech, request):  # noqa: F811
    async with launch_browser(chromium_path, fake_speech, request, ("--ignore-certificate-errors",)) as helper:
        yield helper


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_browsers_join_through_coturn_only(relay_browser, turn, tmp_path, room_name, transport):
    url = {"udp": turn.urls[0], "tcp": turn.urls[1], "tls": turn.urls[2]}[transport]
    server = start_server(tmp_path, env={"BRAID_TURN__URLS": url, "BRAID_TURN__SECRET": turn.secret})
    try:
        alice = await relay_browser.join(server, "Alice", room_name, "relay=1")
        bob = await relay_browser.join(server, "Bob", room_name, "relay=1")
        await wait_video_flowing(alice, await bob.identity(), frames=20)
        await wait_video_flowing(bob, await alice.identity(), frames=20)
        for meet in (alice, bob):
            used = await selected_candidates(meet)
            assert used and all(u == f"relay/{transport}" for u in used), used
    finally:
        server.stop()
    assert ":alice" in turn.log().lower() or ":Alice" in turn.log(), turn.log()[-2000:]
