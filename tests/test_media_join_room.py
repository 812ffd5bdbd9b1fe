"""`braid join-room --publish-demo`: shows up with two tracks another client receives; Ctrl-C leaves cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import dominant_frequency, pattern_matches

pytestmark = pytest.mark.timeout(90)

# The installed `braid` command, run with this interpreter.
RUN = "import sys; from braid.cli import main; sys.exit(main())"


async def test_join_room_publish_demo(dev_server, room_name):
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN, "join-room", "--url", dev_server.ws_url, "--api-key", dev_server.api_key,
         "--api-secret", dev_server.api_secret, "--room", room_name, "--identity", "bot", "--publish-demo",
         "--size", "320x240"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    viewer = Observer("viewer")
    try:
        await viewer.connect(dev_server.ws_url, join_token(dev_server.api_key, dev_server.api_secret, room_name,
                                                           "viewer"))
        assert await wait_until(lambda: "bot" in viewer.room.remote_participants and
                                len(viewer.room.remote_participants["bot"].track_publications) == 2, 20)
        assert await wait_until(lambda: viewer.received.get("bot") is not None and
                                len(viewer.received["bot"].samples) > 150 and viewer.received["bot"].frames > 10, 20)
        got = viewer.received["bot"]
        assert abs(dominant_frequency(got.audio()[-48000:]) - 440) < 8
        assert got.size == (320, 240) and pattern_matches(got.last_frame)
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
        assert proc.returncode == 0, out
        assert "joined room" in out and "left the room" in out
        assert await wait_until(lambda: viewer.saw("participant_disconnected", "bot"), 5), (
            "Ctrl-C leaves at once (no transport timeout)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        await viewer.close()
