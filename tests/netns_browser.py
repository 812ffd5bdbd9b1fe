"""Run inside a network namespace by tests/test_ice_tcp.py: two headless Chromium pages join the meeting page of
the braid-server there and decode each other's camera; prints one JSON line with the selected candidates."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from playwright import async_api as playwright_api

from tests.test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, Browser, selected_candidates, wait_video_flowing


@dataclass
class Server:
    """What the page helpers need of a server: its URL and its log."""

    port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def main(port: int, room: str, log_path: str) -> dict:
    server = Server(port, Path(log_path))
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(server.http_url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        helper = Browser(chromium, ARTIFACTS / "browser" / "ice_tcp_without_udp")
        try:
            alice = await helper.join(server, "Alice", room, "simulcast=0")
            bob = await helper.join(server, "Bob", room, "simulcast=0")
            await wait_video_flowing(alice, await bob.identity(), frames=20, timeout=40)
            await wait_video_flowing(bob, await alice.identity(), frames=20, timeout=40)
            return {"alice": await selected_candidates(alice), "bob": await selected_candidates(bob)}
        finally:
            await helper.save_artifacts()
            await chromium.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))), flush=True)
