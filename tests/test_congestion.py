"""Loss in a subscriber's receiver reports caps its simulcast layer; clean reports lift the cap again."""

from braid.services.media.congestion import CONGESTED_REPORTS, PROBE_AFTER, LossAdapter


def test_sustained_loss_steps_down_one_layer_below_the_current_one():
    adapter = LossAdapter()
    assert not adapter.on_report(0.3, current_quality=2, now=0.0), "one bad report is not enough"
    assert adapter.on_report(0.3, current_quality=2, now=1.0) and adapter.cap == 1
    for i in range(CONGESTED_REPORTS):
        changed = adapter.on_report(0.25, current_quality=1, now=2.0 + i)
    assert changed and adapter.cap == 0
    assert not adapter.on_report(0.5, current_quality=0, now=5.0), "nothing below the lowest layer"


def test_clean_reports_raise_the_cap_one_layer_at_a_time():
    adapter = LossAdapter(cap=0)
    assert not adapter.on_report(0.0, 0, now=0.0)
    assert not adapter.on_report(0.0, 0, now=PROBE_AFTER - 1)
    assert adapter.on_report(0.0, 0, now=PROBE_AFTER) and adapter.cap == 1
    assert not adapter.on_report(0.0, 1, now=PROBE_AFTER + 1), "each step waits again"
    assert adapter.on_report(0.0, 1, now=2 * PROBE_AFTER) and adapter.cap == 2


def test_moderate_loss_neither_raises_nor_lowers():
    adapter = LossAdapter(cap=1)
    for t in range(20):
        assert not adapter.on_report(0.05, 1, now=float(t))
    assert adapter.cap == 1


def test_a_subscriber_cap_follows_its_link(monkeypatch):
    from types import SimpleNamespace

    from braid.services.media.forward import DownTrack
    from braid.services.media.rtcp import ReportBlock

    reassigned = []
    layers = [SimpleNamespace(quality=q) for q in range(3)]
    up = SimpleNamespace(clock_rate=90000, video=True, mime="video/VP8", layers=layers,
                         reassign=lambda: reassigned.append(1))
    down = DownTrack(up, send=lambda packet: None, pt=96)
    down.current = layers[2]
    assert down.max_quality == 2
    lossy = ReportBlock(down.ssrc, 80, 0, 0, 0, 0, 0)  # 80/256 ≈ 31 % lost
    down.on_receiver_report(lossy)
    down.on_receiver_report(lossy)
    assert down.max_quality == 1 and reassigned
    down.set_max_quality(0)
    assert down.max_quality == 0, "the subscriber's own wish still applies"
