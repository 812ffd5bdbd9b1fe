"""Run inside a network namespace by tests/test_ice_tcp.py: wait for the braid-server there, join two Python SDK
participants that each publish a tone and the test pattern, and print one JSON line of what each received."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia, dominant_frequency, pattern_matches


async def main(port: int, room: str) -> dict:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    people = {"alice": 440.0, "bob": 660.0}
    observers = {name: Observer(name) for name in people}
    media = {name: DemoMedia(frequency=freq, width=320, height=240, fps=15) for name, freq in people.items()}
    try:
        for name, observer in observers.items():
            await observer.connect(f"ws://127.0.0.1:{port}", join_token("devkey", "secret", room, name))
            await media[name].start(observer.room)

        def flowing() -> bool:
            return all((got := o.received.get(other)) is not None and got.frames >= 20 and len(got.samples) >= 150
                       for name, o in observers.items() for other in people if other != name)

        ok = await wait_until(flowing, 40)
        result = {"ok": ok}
        for name, observer in observers.items():
            other = next(p for p in people if p != name)
            got = observer.received.get(other)
            result[name] = {
                "frames": got.frames if got else 0,
                "pattern": bool(got and got.last_frame and pattern_matches(got.last_frame)),
                "tone": dominant_frequency(got.audio()[-48000:]) if got else 0.0,
            }
        return result
    finally:
        for m in media.values():
            await m.stop()
        await asyncio.gather(*(o.close() for o in observers.values()), return_exceptions=True)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), sys.argv[2]))), flush=True)
