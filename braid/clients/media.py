"""Generated media for the demo publisher, the tests and the benchmark (no downloads, no devices).

* audio: a sine tone through `rtc.AudioSource` in 10 ms frames;
* video: four coloured quadrants (red, green, blue, white) with a bar that moves each frame, so a receiver can
  check both the content (quadrant colours survive lossy coding) and that frames keep changing;
* analysis helpers for receivers: dominant frequency of received audio, quadrant colours of a received frame.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from livekit import rtc

SAMPLE_RATE = 48000
VIDEO_CODECS = {"vp8": rtc.VideoCodec.VP8, "h264": rtc.VideoCodec.H264, "vp9": rtc.VideoCodec.VP9,
                "av1": rtc.VideoCodec.AV1}
SVC_MODE = "L3T3_KEY"  # what livekit-client publishes VP9/AV1 with by default: 3 spatial x 3 temporal layers
QUADRANTS = ((230, 30, 30), (30, 200, 30), (30, 30, 230), (235, 235, 235))  # TL, TR, BL, BR


def pattern_frame(width: int, height: int, index: int) -> rtc.VideoFrame:
    data = bytearray(width * height * 4)
    img = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 4)
    h2, w2 = height // 2, width // 2
    for i, (y, x) in enumerate(((0, 0), (0, w2), (h2, 0), (h2, w2))):
        img[y:y + h2, x:x + w2, 0:3] = QUADRANTS[i]
    img[:, :, 3] = 255
    bar = (index * 4) % max(width - 8, 1)
    img[h2 - 4:h2 + 4, bar:bar + 8, 0:3] = 0
    return rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, data)


def quadrant_colors(frame: rtc.VideoFrame) -> list[tuple[int, int, int]]:
    """Mean RGB of the centre of each quadrant (TL, TR, BL, BR) of a received frame."""
    rgba = frame.convert(rtc.VideoBufferType.RGBA)
    img = np.frombuffer(bytes(rgba.data), dtype=np.uint8).reshape(rgba.height, rgba.width, 4)
    h, w = rgba.height, rgba.width
    out = []
    for cy, cx in ((h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)):
        patch = img[cy - h // 10:cy + h // 10, cx - w // 10:cx + w // 10, 0:3].reshape(-1, 3)
        out.append(tuple(int(v) for v in patch.mean(axis=0)))
    return out


def pattern_matches(frame: rtc.VideoFrame, tolerance: int = 60) -> bool:
    colors = quadrant_colors(frame)
    return all(max(abs(a - b) for a, b in zip(got, want)) <= tolerance for got, want in zip(colors, QUADRANTS))


def dominant_frequency(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    if len(samples) < 1024:
        return 0.0
    x = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(x))
    spectrum[0] = 0
    return float(np.argmax(spectrum) * rate / len(samples))


@dataclass
class DemoMedia:
    """Publishes a sine tone and the pattern video on a connected room until `stop()`."""

    frequency: float = 440.0
    width: int = 320
    height: int = 240
    fps: float = 15.0
    simulcast: bool = False  # for VP9 and AV1: SVC layers (SVC_MODE) in one stream
    codec: str = ""  # a VIDEO_CODECS key; "": the SDK's default (VP8)
    audio: bool = True
    video: bool = True
    tasks: list[asyncio.Task] = field(default_factory=list)
    publications: list = field(default_factory=list)
    frames_sent: int = 0

    async def start(self, room: rtc.Room) -> None:
        lp = room.local_participant
        if self.audio:
            source = rtc.AudioSource(SAMPLE_RATE, 1)
            track = rtc.LocalAudioTrack.create_audio_track("demo-tone", source)
            self.publications.append(await lp.publish_track(
                track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)))
            self.tasks.append(asyncio.create_task(self._tone(source), name="demo-audio"))
        if self.video:
            source = rtc.VideoSource(self.width, self.height)
            track = rtc.LocalVideoTrack.create_video_track("demo-pattern", source)
            options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA, simulcast=self.simulcast)
            if self.codec:
                options.video_codec = VIDEO_CODECS[self.codec]
                if self.simulcast and self.codec in ("vp9", "av1"):
                    options.scalability_mode = SVC_MODE
            self.publications.append(await lp.publish_track(track, options))
            self.tasks.append(asyncio.create_task(self._pattern(source), name="demo-video"))

    async def _tone(self, source: rtc.AudioSource) -> None:
        n = SAMPLE_RATE // 100
        t = 0
        while True:
            frame = rtc.AudioFrame.create(SAMPLE_RATE, 1, n)
            samples = np.sin(2 * np.pi * self.frequency * (np.arange(n) + t) / SAMPLE_RATE) * 12000
            np.copyto(np.frombuffer(frame.data, dtype=np.int16), samples.astype(np.int16))
            t = (t + n) % (SAMPLE_RATE * 100)
            await source.capture_frame(frame)

    async def _pattern(self, source: rtc.VideoSource) -> None:
        period = 1.0 / self.fps
        next_at = time.monotonic()
        while True:
            source.capture_frame(pattern_frame(self.width, self.height, self.frames_sent))
            self.frames_sent += 1
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


@dataclass
class Received:
    """What a subscriber collected from one remote participant's tracks."""

    samples: list[np.ndarray] = field(default_factory=list)
    frames: int = 0
    last_frame: rtc.VideoFrame | None = None
    size: tuple[int, int] = (0, 0)

    def audio(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(0, dtype=np.int16)


async def collect_audio(track: rtc.Track, into: Received, stop: asyncio.Event) -> None:
    stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
    try:
        async for event in stream:
            into.samples.append(np.frombuffer(bytes(event.frame.data), dtype=np.int16).copy())
            if stop.is_set():
                break
    finally:
        await stream.aclose()


async def collect_video(track: rtc.Track, into: Received, stop: asyncio.Event) -> None:
    stream = rtc.VideoStream(track)
    try:
        async for event in stream:
            into.frames += 1
            into.last_frame = event.frame
            into.size = (event.frame.width, event.frame.height)
            if stop.is_set():
                break
    finally:
        await stream.aclose()
