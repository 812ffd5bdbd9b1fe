"""The connection quality model (LiveKit's scorer: weights, smoothing, levels) on synthetic windows."""

from __future__ import annotations

from livekit.protocol import models

from braid.services.media.quality import Scorer, Window, loss_weight, to_mos, to_quality

Q = models.ConnectionQuality


def _run(scorer: Scorer, loss: float, windows: int, packets: int = 250) -> list[int]:
    levels = []
    for _ in range(windows):
        scorer.update(Window(5.0, packets, int(packets * loss)))
        levels.append(to_quality(scorer.score))
    return levels


def test_levels_follow_loss_per_codec():
    video = Scorer(loss_weight("video/VP8", False), include_rtt=True, include_jitter=True)
    assert _run(video, 0.0, 2) == [Q.EXCELLENT, Q.EXCELLENT]
    assert _run(video, 0.10, 1) == [Q.POOR]  # falls at once
    assert _run(video, 0.0, 3) == [Q.GOOD, Q.GOOD, Q.EXCELLENT]  # recovers slowly
    opus = Scorer(loss_weight("audio/opus", False), include_rtt=True, include_jitter=True)
    assert _run(opus, 0.05, 3)[-1] == Q.GOOD
    assert _run(opus, 0.10, 3)[-1] == Q.POOR
    fec = Scorer(loss_weight("audio/opus", True), include_rtt=True, include_jitter=True)
    assert _run(fec, 0.10, 4)[-1] == Q.GOOD  # in-band FEC absorbs some
    red = Scorer(loss_weight("audio/red", False), include_rtt=True, include_jitter=True)
    assert _run(red, 0.10, 4)[-1] == Q.GOOD


def test_delay_and_floor():
    s = Scorer(loss_weight("video/VP8", False), include_rtt=True, include_jitter=True)
    s.update(Window(5.0, 250, 0, rtt_ms=400.0))  # 200 ms one way: (200 - 120) / 10 = 8 points
    assert 90 < s.score < 95
    for _ in range(5):
        s.update(Window(5.0, 250, 250))
    assert s.score == 30.0 and to_quality(s.score) == Q.POOR  # never below POOR while packets flow


def test_lost_dry_and_muted():
    s = Scorer(10.0, True, True)
    s.lost()
    assert to_quality(s.score) == Q.LOST
    s.reset()
    assert to_quality(s.score) == Q.LOST  # muting does not hide a lost connection
    s.update(Window(5.0, 0, 0))
    assert to_quality(s.score) == Q.POOR
    s.reset()
    assert to_quality(s.score) == Q.EXCELLENT
    assert to_mos(100) == 4.5 and to_mos(0) == 1.0 and 3.9 < to_mos(85) < 4.5


def test_a_lower_packet_rate_weighs_loss_less():
    s = Scorer(loss_weight("audio/opus", False), True, True)
    s.update(Window(5.0, 250, 0))  # 50 pps
    s.update(Window(5.0, 10, 1))  # DTX: 2 pps, one lost
    assert to_quality(s.score) != Q.POOR
