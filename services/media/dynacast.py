"""Dynacast: tell a simulcast publisher which layers anyone watches, so it can pause the rest.

A layer is wanted when some subscriber's quality cap reaches it — a local subscriber's, or one on another media
node, whose wishes arrive over the relay (`UpTrack.demand`); every layer below the highest wanted one
stays on too (fallback for subscribers on poor links and for layer switches). Turning layers on is sent
at once; turning them off waits until the wish has been stable for `DOWNGRADE_DELAY`, so a subscriber
that briefly re-subscribes does not make the publisher stop and restart its encoders.
"""

from __future__ import annotations

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from .forward import QUALITY_OF_RID, UpTrack

DOWNGRADE_DELAY = 3.0
QUALITIES = (models.VideoQuality.LOW, models.VideoQuality.MEDIUM, models.VideoQuality.HIGH)


def wanted_qualities(up: UpTrack) -> tuple[bool, bool, bool]:
    """Which of LOW/MEDIUM/HIGH the track's active subscribers, here and on other nodes, need."""
    top = max((QUALITY_OF_RID.get(r, i) for i, r in enumerate(up.expected_rids)), default=2)
    highest = min(max(up.demand(), default=-1), top)
    return tuple(q <= highest for q in range(3))  # type: ignore[return-value]


class Dynacast:
    def __init__(self, track_sid: str, codec: str):
        self.track_sid = track_sid
        self.codec = codec  # e.g. "vp8", as the SDKs name their publishing codecs
        # A publisher starts with every layer on.
        self.sent: tuple[bool, bool, bool] = (True, True, True)
        self._pending: tuple[bool, bool, bool] | None = None
        self._pending_since = 0.0

    def update(self, up: UpTrack, now: float) -> rtc_pb.SubscribedQualityUpdate | None:
        """The update to send now, if the wanted layers changed (after the downgrade delay)."""
        if len(up.expected_rids) < 2:
            return None
        wanted = wanted_qualities(up)
        if wanted == self.sent:
            self._pending = None
            return None
        upgrade = any(w and not s for w, s in zip(wanted, self.sent))
        if not upgrade:
            if wanted != self._pending:
                self._pending, self._pending_since = wanted, now
                return None
            if now - self._pending_since < DOWNGRADE_DELAY:
                return None
        self.sent, self._pending = wanted, None
        qualities = [rtc_pb.SubscribedQuality(quality=q, enabled=on) for q, on in zip(QUALITIES, wanted)]
        return rtc_pb.SubscribedQualityUpdate(
            track_sid=self.track_sid,
            subscribed_qualities=qualities,
            subscribed_codecs=[rtc_pb.SubscribedCodec(codec=self.codec, qualities=qualities)],
        )
