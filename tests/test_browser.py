"""The browser SDK for real: headless Chromium runs Braid's demo meeting page (livekit-client 2.23).

Chromium is Debian's (/usr/bin/chromium), driven by Playwright's Python package; the fixture runs
scripts/ensure-browser-deps.sh when Chromium is missing, so a fresh machine installs it. Chrome's fake
camera supplies video (a moving test pattern at the requested size) and its fake microphone plays a
generated WAV loop: 2 s of voice-like sound, 2 s of silence.

Every page's console and a screenshot land in test-artifacts/browser/<test>/ at teardown, and the
two-participant screenshot the README shows is written to test-artifacts/meet-two-participants.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import jwt
import pytest
from playwright import async_api as playwright_api  # the `test` extra: pip install -e '.[test]'

from .servers import DEV_KEY, DEV_SECRET, ROOT, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

CHROMIUM = os.environ.get("BRAID_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    # Background pages must keep decoding and sending at full rate.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


# ------------------------------------------------------------------------------------------------
# browser plumbing


@pytest.fixture(scope="session")
def fake_speech(tmp_path_factory) -> Path:
    """A 4 s loop for Chrome's fake microphone: 2 s of speech-like voiced sound, then 2 s of silence.

    Chrome's built-in fake microphone only beeps for ~80 ms every 500 ms, which a speaker detector that
    looks at the share of loud packets (as LiveKit's does) rightly ignores.
    """
    rate = 48_000
    path = tmp_path_factory.mktemp("fake-audio") / "speech.wav"
    samples = bytearray()
    phase = 0.0
    for i in range(rate * 4):
        t = i / rate
        value = 0.0
        if t < 2.0:
            f0 = 150 + 50 * math.sin(2 * math.pi * 1.3 * t)  # a wandering pitch, as a voice has
            phase += 2 * math.pi * f0 / rate
            envelope = 0.55 + 0.45 * math.sin(2 * math.pi * 4 * t)  # about four syllables a second
            value = sum(math.sin(k * phase) / k for k in range(1, 8)) * envelope * 7000
        samples += struct.pack("<h", int(max(-32767, min(32767, value))))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(samples))
    return path


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium, installed by scripts/ensure-browser-deps.sh when missing."""
    if not os.access(CHROMIUM, os.X_OK):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "ensure-browser-deps.sh")],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, f"ensure-browser-deps.sh failed:\n{result.stdout}\n{result.stderr}"
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} missing after scripts/ensure-browser-deps.sh"
    return CHROMIUM


@dataclass
class MeetPage:
    """One browser context (its own profile, fake devices) with the meeting page open."""

    label: str
    page: Any
    server: ServerProcess
    console: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)

    async def js(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)

    async def identity(self) -> str:
        return await self.js("() => window.braidRoom?.localParticipant.identity ?? ''")

    async def inbound(self) -> list[dict]:
        return await self.js("() => window.braidMeet.inboundStats()")

    def diagnostics(self) -> str:
        tail = "\n".join(self.console[-40:])
        return f"--- {self.label} console (last 40) ---\n{tail}\n--- websockets: {self.websockets}"


class Browser:
    """Opens meeting pages and, at teardown, saves what they show and logged."""

    def __init__(self, browser: Any, artifact_dir: Path):
        self.browser = browser
        self.artifact_dir = artifact_dir
        self.pages: list[MeetPage] = []

    async def open(self, server: ServerProcess, label: str, query: str = "") -> MeetPage:
        context = await self.browser.new_context(viewport={"width": 1280, "height": 720})
        page = await context.new_page()
        meet = MeetPage(label=label, page=page, server=server)
        page.on("console", lambda msg: meet.console.append(f"[{msg.type}] {msg.text}"))
        page.on("pageerror", lambda err: meet.console.append(f"[pageerror] {err}"))
        page.on("websocket", lambda ws: meet.websockets.append(ws.url))
        self.pages.append(meet)
        await page.goto(f"{server.http_url}/meet{'?' + query if query else ''}", timeout=15_000)
        await page.wait_for_function("() => !!window.braidMeet", timeout=10_000)
        return meet

    async def join(self, server: ServerProcess, label: str, room: str, query: str = "",
                   tokens: Callable[[dict[str, str]], dict] | None = None) -> MeetPage:
        """Open the page, fill in the form as a user would, and wait until the Room is connected.

        `tokens` answers the page's `/dev/token` request (its query → {"token", "url"}) for servers that hand out
        none, as an application's own token endpoint would."""
        meet = await self.open(server, label, query)
        if tokens is not None:
            async def answer(route) -> None:
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(route.request.url).query))
                await route.fulfill(status=200, content_type="application/json", body=json.dumps(tokens(query)))

            await meet.page.route("**/dev/token?*", answer)
        await meet.page.fill("#name", label)
        await meet.page.fill("#room", room)
        await meet.page.click("#join")
        state = await wait_until(
            lambda: meet.js(
                "() => { const e = document.getElementById('join-error');"
                " if (!e.hidden) return 'join failed: ' + e.textContent;"
                " return window.braidRoom?.state === 'connected' ? 'connected' : ''; }"
            ),
            timeout=25,
            what=f"{label} to connect to room {room}",
            pages=[meet],
        )
        if state != "connected":
            pytest.fail(f"{label}: {state}\n{meet.diagnostics()}\n--- server log (tail) ---\n{server.log()[-4000:]}")
        return meet

    async def save_artifacts(self) -> None:
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        for meet in self.pages:
            (self.artifact_dir / f"{meet.label}.log").write_text(
                "\n".join(meet.console) + "\n--- websockets\n" + "\n".join(meet.websockets) + "\n"
            )
            try:
                await meet.page.screenshot(path=str(self.artifact_dir / f"{meet.label}.png"), timeout=5_000)
            except Exception:  # a crashed or closed page has nothing to show
                pass


@pytest.fixture
async def browser(chromium_path, fake_speech, request):
    async with launch_browser(chromium_path, fake_speech, request) as helper:
        yield helper


@contextlib.asynccontextmanager
async def launch_browser(chromium_path: str, fake_speech: Path, request, extra_args: tuple[str, ...] = ()):
    """Headless Chromium with fake devices (and `extra_args`); artifacts saved under the test's name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=chromium_path,
            headless=True,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={fake_speech}", *extra_args],
        )
        helper = Browser(chromium, ARTIFACTS / "browser" / name)
        try:
            yield helper
        finally:
            await helper.save_artifacts()
            await chromium.close()


async def wait_until(
    probe: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    what: str,
    pages: list[MeetPage] = (),
    server: ServerProcess | None = None,
    interval: float = 0.25,
) -> Any:
    """Poll `probe` until it returns something truthy; on timeout, fail with the pages' and server's logs."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            details = "\n".join(p.diagnostics() for p in pages)
            srv = server or (pages[0].server if pages else None)
            if srv is not None:
                details += "\n--- server log (tail) ---\n" + srv.log()[-4000:]
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last value: {last!r}\n{details}")
        await asyncio.sleep(interval)


def video_from(stats: list[dict], identity: str) -> dict | None:
    return next((s for s in stats if s["identity"] == identity and s["kind"] == "video"), None)


def audio_from(stats: list[dict], identity: str) -> dict | None:
    return next((s for s in stats if s["identity"] == identity and s["kind"] == "audio"), None)


async def wait_video_flowing(viewer: MeetPage, identity: str, *, frames: int = 30, timeout: float = 30) -> dict:
    """Wait until `viewer` decodes video from `identity`, then until `frames` more frames are decoded."""
    first = await wait_until(
        lambda: _video_if(viewer, identity, lambda s: s["framesDecoded"] > 0),
        timeout=timeout, what=f"{viewer.label} to decode video from {identity}", pages=[viewer],
    )
    target = first["framesDecoded"] + frames
    return await wait_until(
        lambda: _video_if(viewer, identity, lambda s: s["framesDecoded"] >= target),
        timeout=timeout,
        what=f"{viewer.label}'s framesDecoded from {identity} to grow past {target} (was {first['framesDecoded']})",
        pages=[viewer],
    )


async def selected_candidates(meet: MeetPage) -> list[str]:
    """`type/protocol` of the local candidate of each PeerConnection's selected pair (`relay/tls`, `host/tcp`…)."""
    return await meet.js("""async () => {
        const pcs = [];
        const m = window.braidRoom.engine.pcManager;
        for (const t of [m?.publisher, m?.subscriber]) if (t?.pc && !pcs.includes(t.pc)) pcs.push(t.pc);
        const out = [];
        for (const pc of pcs) {
            const stats = await pc.getStats();
            stats.forEach(s => {
                if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
                    const local = stats.get(s.localCandidateId);
                    out.push(`${local.candidateType}/${local.relayProtocol || local.protocol}`);
                }
            });
        }
        return out;
    }""")


async def _video_if(viewer: MeetPage, identity: str, cond: Callable[[dict], bool]) -> dict | None:
    stats = video_from(await viewer.inbound(), identity)
    return stats if stats and cond(stats) else None


# ------------------------------------------------------------------------------------------------
# the page and the dev-token endpoint


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def test_meet_page_and_dev_token_are_served(dev_server):
    for path in ("/", "/meet", "/meet/"):
        status, ctype, body = http_get(dev_server.http_url + path)
        assert status == 200 and ctype.startswith("text/html"), (path, status, ctype)
        assert b"/meet/meet.js" in body and b"/meet/meet.css" in body
    for path, ctype_prefix in (("/meet/meet.js", ("application/javascript", "text/javascript")),
                               ("/meet/meet.css", ("text/css",))):
        status, ctype, body = http_get(dev_server.http_url + path)
        assert status == 200 and ctype.startswith(ctype_prefix) and len(body) > 1000, (path, status, ctype)
    assert http_get(dev_server.http_url + "/meet/../server.py")[0] == 404
    assert http_get(dev_server.http_url + "/meet/nothing.js")[0] == 404

    status, ctype, body = http_get(dev_server.http_url + "/dev/token?room=r1&identity=ada&name=Ada%20L")
    assert status == 200 and ctype.startswith("application/json")
    answer = json.loads(body)
    assert answer["url"] == dev_server.ws_url
    claims = jwt.decode(answer["token"], DEV_SECRET, algorithms=["HS256"])
    assert claims["iss"] == DEV_KEY and claims["sub"] == "ada" and claims["name"] == "Ada L"
    assert claims["video"] == {
        "roomJoin": True, "room": "r1", "canPublish": True, "canSubscribe": True, "canPublishData": True,
    }
    assert http_get(dev_server.http_url + "/dev/token?identity=ada")[0] == 400


async def test_dev_token_exists_only_in_dev_mode(browser, server_factory):
    server = server_factory(dev=False, env={"BRAID_KEYS": "prodkey: a-much-longer-production-secret"})
    assert http_get(server.http_url + "/dev/token?room=r1&identity=ada")[0] == 404
    # The page itself is still served, and says why it cannot join.
    meet = await browser.open(server, "no-dev")
    await meet.page.fill("#name", "Ada")
    await meet.page.fill("#room", "r1")
    await meet.page.click("#join")
    error = meet.page.locator("#join-error")
    await error.wait_for(state="visible", timeout=10_000)
    assert "dev" in (await error.text_content())


# ------------------------------------------------------------------------------------------------
# headless Chromium


async def test_page_loads_and_tries_rtc_v1_first(browser, dev_server, room_name):
    """The page renders, and the SDK's first WebSocket goes to /rtc/v1 with the token as a query parameter."""
    meet = await browser.open(dev_server, "lobby")
    assert await meet.page.title() == "Braid Meet"
    assert await meet.page.is_visible("#join-form")
    await meet.page.fill("#name", "Lobby Test")
    await meet.page.fill("#room", room_name)
    await meet.page.click("#join")
    await wait_until(lambda: asyncio.sleep(0, meet.websockets), timeout=15, what="a WebSocket", pages=[meet])
    first = meet.websockets[0]
    assert first.startswith(dev_server.ws_url + "/rtc/v1?"), first
    assert "access_token=" in first and "join_request=" in first, first
    errors = [line for line in meet.console if line.startswith("[pageerror]")]
    assert not errors, errors


async def test_two_pages_see_each_other(browser, dev_server, room_name):
    """Two browsers in one room each decode the other's camera; a screenshot shows the meeting."""
    room = "team-standup-" + room_name[-4:]  # the screenshot is the README's picture
    alice = await browser.join(dev_server, "Alice", room)
    bob = await browser.join(dev_server, "Bob", room)
    alice_id, bob_id = await alice.identity(), await bob.identity()

    for meet in (alice, bob):
        assert any("/rtc/v1?" in url for url in meet.websockets), meet.websockets
        sid = await meet.js("() => window.braidRoom.localParticipant.sid")
        assert sid.startswith("PA_"), sid

    await wait_video_flowing(alice, bob_id)
    await wait_video_flowing(bob, alice_id)

    # Both tiles are on both pages, with video playing.
    for meet in (alice, bob):
        await wait_until(
            lambda: meet.js(
                "() => [...document.querySelectorAll('.tile')].filter(t => t.dataset.video === 'on'"
                " && t.querySelector('video').videoWidth > 0).length === 2"
            ),
            timeout=15, what=f"two playing tiles on {meet.label}'s page", pages=[meet],
        )

    # For the picture only (test_speaking_indicator_and_mute checks it): catch a speaking ring if one shows.
    try:
        await alice.page.wait_for_selector(".tile[data-speaking='true']", timeout=6_000)
    except playwright_api.TimeoutError:
        pass
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "meet-two-participants.png"
    await alice.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


async def test_speaking_indicator(browser, dev_server, room_name):
    """Alice's microphone loop alternates 2 s of voice and 2 s of silence: Bob's page rings her tile, then not."""
    alice = await browser.join(dev_server, "Alice", room_name, "res=360")
    bob = await browser.join(dev_server, "Bob", room_name, "res=360")
    tile = f".tile[data-identity='{await alice.identity()}']"
    await wait_until(
        lambda: bob.js(f"() => document.querySelector(\"{tile}\")?.dataset.speaking === 'true'"),
        timeout=30, what="Bob's page to show Alice speaking", pages=[bob, alice],
    )
    await wait_until(
        lambda: bob.js(f"() => document.querySelector(\"{tile}\")?.dataset.speaking === 'false'"),
        timeout=15, what="Bob's page to show Alice stopped speaking", pages=[bob, alice],
    )


async def test_mute_camera_and_leave_show_on_the_other_page(browser, dev_server, room_name):
    """Alice mutes, turns her camera off and on, unmutes, leaves: Bob's page follows each step."""
    alice = await browser.join(dev_server, "Alice", room_name, "res=360")
    bob = await browser.join(dev_server, "Bob", room_name, "res=360")
    tile = f".tile[data-identity='{await alice.identity()}']"

    async def bob_sees(attribute: str, value: str, what: str, timeout: float = 10) -> None:
        await wait_until(
            lambda: bob.js(f"() => document.querySelector(\"{tile}\")?.dataset.{attribute} === '{value}'"),
            timeout=timeout, what=f"Bob's page to show {what}", pages=[bob, alice],
        )

    await bob_sees("mic", "on", "Alice's microphone on")
    await bob_sees("video", "on", "Alice's camera on", timeout=20)
    await alice.page.click("#toggle-mic")
    await bob_sees("mic", "muted", "Alice muted")
    await alice.page.click("#toggle-cam")
    await bob_sees("video", "off", "Alice's camera off")
    await alice.page.click("#toggle-cam")
    await bob_sees("video", "on", "Alice's camera back on", timeout=15)
    await alice.page.click("#toggle-mic")
    await bob_sees("mic", "on", "Alice unmuted")

    await alice.page.click("#leave")
    await wait_until(
        lambda: bob.js(f"() => !document.querySelector(\"{tile}\")"),
        timeout=10, what="Alice's tile to leave Bob's page", pages=[bob, alice],
    )
    assert await alice.page.is_visible("#join-form")


async def test_low_quality_subscriber_gets_low_layer(browser, dev_server, room_name):
    """A subscriber that asks for VideoQuality.LOW is switched to the lowest simulcast layer (320x180)."""
    pub = await browser.join(dev_server, "Publisher", room_name, "res=540")
    sub = await browser.join(dev_server, "Subscriber", room_name, "adaptive=0")
    pub_id = await pub.identity()

    simulcast = await pub.js(
        "() => { const p = window.braidRoom.localParticipant.getTrackPublication('camera');"
        " return p?.trackInfo?.layers?.length ?? 0; }"
    )
    assert simulcast >= 2, f"the publisher announced {simulcast} simulcast layers"

    # High is requested by default: once bandwidth allows, more than the low layer arrives.
    await wait_until(
        lambda: _video_if(sub, pub_id, lambda s: s["frameWidth"] > 320),
        timeout=40, what="a layer above 320 px wide at the subscriber", pages=[sub, pub],
    )
    await sub.js("(id) => window.braidMeet.setVideoQuality(id, 'low')", pub_id)
    low = await wait_until(
        lambda: _video_if(sub, pub_id, lambda s: 0 < s["frameWidth"] <= 320),
        timeout=20, what="the low layer (<= 320 px wide) at the subscriber", pages=[sub, pub],
    )
    # ... and it keeps flowing at that size.
    more = await wait_until(
        lambda: _video_if(sub, pub_id, lambda s: s["framesDecoded"] >= low["framesDecoded"] + 20),
        timeout=15, what="frames to keep coming on the low layer", pages=[sub, pub],
    )
    assert more["frameWidth"] <= 320, more

    # Dynacast: nobody watches the upper layers any more, so the publisher is told to pause them.
    async def encoding(rid: str) -> dict:
        layers = await pub.js(
            "async () => { const p = window.braidRoom.localParticipant.getTrackPublication('camera');"
            " const stats = await p.videoTrack.sender.getStats(); const out = {};"
            " stats.forEach(s => { if (s.type === 'outbound-rtp') out[s.rid || ''] ="
            " {frames: s.framesEncoded || 0, active: s.active !== false}; }); return out; }"
        )
        return layers.get(rid, {"frames": 0, "active": False})

    async def upper_layers_paused() -> bool:
        before = await encoding("f")
        await asyncio.sleep(1.0)
        after = await encoding("f")
        return not after["active"] or after["frames"] == before["frames"]

    await wait_until(upper_layers_paused, timeout=20, what="the publisher to pause its top layer", pages=[sub, pub])
    low_before = await encoding("q")
    await asyncio.sleep(1.0)
    assert (await encoding("q"))["frames"] > low_before["frames"], "the watched low layer keeps being encoded"


async def test_v0_fallback_when_rtc_v1_is_off(browser, server_factory, room_name):
    """With /rtc/v1 disabled the SDK falls back to /rtc (two PeerConnections), and media still flows."""
    server = server_factory(env={"BRAID_RTC__ENABLE_V1": "false"})
    alice = await browser.join(server, "Alice", room_name, "res=360")
    bob = await browser.join(server, "Bob", room_name, "res=360")
    for meet in (alice, bob):
        assert meet.websockets[0].startswith(server.ws_url + "/rtc/v1?"), meet.websockets
        assert any(re.match(re.escape(server.ws_url) + r"/rtc\?", url) for url in meet.websockets), meet.websockets
    await wait_video_flowing(alice, await bob.identity())
    await wait_video_flowing(bob, await alice.identity())


# ------------------------------------------------------------------------------------------------
# a browser and the Python SDK in one room


class PythonPeer:
    """A Python SDK participant publishing a moving test pattern and a tone, and recording what it gets."""

    WIDTH, HEIGHT, FPS = 320, 240, 15
    RATE, CHUNK = 48_000, 480  # 10 ms of mono audio

    def __init__(self, rtc: Any):
        self.rtc = rtc
        self.room = rtc.Room()
        self.video_frames: dict[str, list[tuple[int, int]]] = {}
        self.audio_frames: dict[str, int] = {}
        self.data: list[tuple[str, str, str]] = []
        self.tasks: list[asyncio.Task] = []
        self.room.on("track_subscribed", self._on_track)
        self.room.on("data_received", self._on_data)

    def _on_track(self, track: Any, publication: Any, participant: Any) -> None:
        identity = participant.identity
        if track.kind == self.rtc.TrackKind.KIND_VIDEO:
            self.tasks.append(asyncio.ensure_future(self._read_video(self.rtc.VideoStream(track), identity)))
        elif track.kind == self.rtc.TrackKind.KIND_AUDIO:
            self.tasks.append(asyncio.ensure_future(self._read_audio(self.rtc.AudioStream(track), identity)))

    def _on_data(self, packet: Any) -> None:
        sender = packet.participant.identity if packet.participant else ""
        self.data.append((sender, packet.topic or "", packet.data.decode(errors="replace")))

    async def _read_video(self, stream: Any, identity: str) -> None:
        frames = self.video_frames.setdefault(identity, [])
        async for event in stream:
            frames.append((event.frame.width, event.frame.height))

    async def _read_audio(self, stream: Any, identity: str) -> None:
        self.audio_frames.setdefault(identity, 0)
        async for _ in stream:
            self.audio_frames[identity] += 1

    async def connect_and_publish(self, url: str, token: str) -> None:
        await self.room.connect(url, token)
        video = self.rtc.VideoSource(self.WIDTH, self.HEIGHT)
        audio = self.rtc.AudioSource(self.RATE, 1)
        opts = self.rtc.TrackPublishOptions
        await self.room.local_participant.publish_track(
            self.rtc.LocalVideoTrack.create_video_track("py-camera", video),
            opts(source=self.rtc.TrackSource.SOURCE_CAMERA),
        )
        await self.room.local_participant.publish_track(
            self.rtc.LocalAudioTrack.create_audio_track("py-mic", audio),
            opts(source=self.rtc.TrackSource.SOURCE_MICROPHONE),
        )
        self.tasks.append(asyncio.ensure_future(self._pump_video(video)))
        self.tasks.append(asyncio.ensure_future(self._pump_audio(audio)))

    async def _pump_video(self, source: Any) -> None:
        import numpy as np

        x = np.arange(self.WIDTH)
        frame = np.empty((self.HEIGHT, self.WIDTH, 4), np.uint8)
        frame[..., 3] = 255
        n = 0
        while True:
            ramp = (((x + n * 8) % self.WIDTH) * 255 // self.WIDTH).astype(np.uint8)
            frame[..., 0] = ramp
            frame[..., 1] = 255 - ramp
            frame[..., 2] = (n * 5) % 256
            source.capture_frame(
                self.rtc.VideoFrame(self.WIDTH, self.HEIGHT, self.rtc.VideoBufferType.RGBA, frame.tobytes())
            )
            n += 1
            await asyncio.sleep(1 / self.FPS)

    async def _pump_audio(self, source: Any) -> None:
        phase = 0
        while True:
            samples = bytearray()
            for i in range(self.CHUNK):
                value = int(8000 * math.sin(2 * math.pi * 440 * (phase + i) / self.RATE))
                samples += value.to_bytes(2, "little", signed=True)
            phase += self.CHUNK
            await source.capture_frame(self.rtc.AudioFrame(bytes(samples), self.RATE, 1, self.CHUNK))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.room.disconnect()


async def test_page_and_python_sdk_exchange_audio_video_and_data(browser, dev_server, room_name):
    from livekit import api, rtc

    token = (
        api.AccessToken(DEV_KEY, DEV_SECRET)
        .with_identity("py-peer")
        .with_name("Python")
        .with_grants(api.VideoGrants(room_join=True, room=room_name))
        .to_jwt()
    )
    peer = PythonPeer(rtc)
    try:
        await asyncio.wait_for(peer.connect_and_publish(dev_server.ws_url, token), 20)
        page = await browser.join(dev_server, "Browser", room_name, "res=360")
        page_id = await page.identity()

        # The browser decodes the Python participant's video and receives its audio.
        await wait_video_flowing(page, "py-peer", frames=20)
        first_audio = await wait_until(
            lambda: _audio_if(page, "py-peer", lambda s: s["packetsReceived"] > 0),
            timeout=20, what="the page to receive audio from py-peer", pages=[page],
        )
        await wait_until(
            lambda: _audio_if(page, "py-peer", lambda s: s["packetsReceived"] >= first_audio["packetsReceived"] + 50),
            timeout=15, what="audio packets from py-peer to keep arriving", pages=[page],
        )

        # The Python participant gets the browser's camera (simulcast: any layer) and microphone.
        await wait_until(
            lambda: asyncio.sleep(0, len(peer.video_frames.get(page_id, [])) >= 20),
            timeout=30, what="py-peer to receive 20 video frames from the page", pages=[page],
        )
        width, height = peer.video_frames[page_id][-1]
        assert width >= 160 and height >= 90, (width, height)
        await wait_until(
            lambda: asyncio.sleep(0, peer.audio_frames.get(page_id, 0) >= 50),
            timeout=20, what="py-peer to receive 50 audio frames from the page", pages=[page],
        )

        # Data both ways (reliable). The first packets may race the data channel opening: resend until seen.
        async def python_to_page() -> bool:
            await peer.room.local_participant.publish_data(b"hello from python", topic="chat")
            got = await page.js("() => window.braidMeet.received.map(m => [m.from, m.topic, m.text])")
            return ["py-peer", "chat", "hello from python"] in got

        async def page_to_python() -> bool:
            await page.js("() => window.braidMeet.sendData('hello from the browser', 'chat')")
            await asyncio.sleep(0.2)
            return (page_id, "chat", "hello from the browser") in peer.data

        await wait_until(python_to_page, timeout=15, interval=0.5, what="data from python to the page", pages=[page])
        await wait_until(page_to_python, timeout=15, interval=0.5, what="data from the page to python", pages=[page])
    finally:
        await peer.close()


async def _audio_if(viewer: MeetPage, identity: str, cond: Callable[[dict], bool]) -> dict | None:
    stats = audio_from(await viewer.inbound(), identity)
    return stats if stats and cond(stats) else None

