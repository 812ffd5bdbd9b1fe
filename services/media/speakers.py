"""Active speaker detection from the RFC 6464 audio level header extension (no decoding).

Each published audio track keeps an `AudioLevel` fed by its packets; every `UPDATE_INTERVAL` the room asks
`Speakers` for the participants whose level changed and sends them `speakers_changed`. A participant speaks when
at least `MIN_ACTIVE_FRACTION` of its packets in the interval were louder than `ACTIVE_LEVEL` dBov; the level
sent is a smoothed linear value in (0, 1].
"""

from __future__ import annotations

from livekit.protocol import models

from . import rtp

ACTIVE_LEVEL = 35  # dBov
MIN_ACTIVE_FRACTION = 0.4
UPDATE_INTERVAL = 0.4
SMOOTHING = 2 / 3  # EMA over about two intervals
LEVEL_CHANGE = 0.05  # a speaker's level is re-sent when it moved this much
REFRESH_EVERY = 8  # intervals: active speakers are re-announced this often (late listeners, lost updates)


class AudioLevel:
    __slots__ = ("ext_id", "observed", "active", "loudest", "smoothed")

    def __init__(self, ext_id: int):
        self.ext_id = ext_id
        self.observed = self.active = 0
        self.loudest = 127
        self.smoothed = 0.0

    def observe(self, data: bytes) -> None:
        level = rtp.audio_level(data, self.ext_id)
        if level is None:
            return
        self.observed += 1
        if level <= ACTIVE_LEVEL:
            self.active += 1
            if level < self.loudest:
                self.loudest = level

    def take(self) -> float:
        """The level for the interval just ended (0 when not speaking); resets the counters."""
        speaking = self.observed > 0 and self.active >= MIN_ACTIVE_FRACTION * self.observed
        current = 10 ** (-self.loudest / 20) if speaking else 0.0
        self.smoothed += (current - self.smoothed) * SMOOTHING
        self.observed = self.active = 0
        self.loudest = 127
        if not speaking:
            self.smoothed = 0.0
        return self.smoothed


class Speakers:
    """What each participant's listeners were last told, to send only changes."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}  # participant sid → level last announced (0 = silent)
        self.rounds = 0

    def current(self) -> list[models.SpeakerInfo]:
        return [models.SpeakerInfo(sid=sid, level=level, active=True) for sid, level in self.sent.items() if level > 0]

    def update(self, levels: dict[str, float]) -> list[models.SpeakerInfo]:
        changed = []
        self.rounds += 1
        refresh = self.rounds % REFRESH_EVERY == 0
        for sid, level in levels.items():
            before = self.sent.get(sid, 0.0)
            moved = (level > 0) != (before > 0) or (level > 0 and abs(level - before) >= LEVEL_CHANGE)
            if moved or (refresh and level > 0):
                changed.append(models.SpeakerInfo(sid=sid, level=level, active=level > 0))
                self.sent[sid] = level
        for sid in [s for s in self.sent if s not in levels]:
            if self.sent.pop(sid) > 0:
                changed.append(models.SpeakerInfo(sid=sid, level=0.0, active=False))
        return changed
