"""Loss in a subscriber's receiver reports caps its simulcast layer; clean reports lift the cap again; heavy loss
on the lowest layer pauses the stream, and the subscriber is told."""

from types import SimpleNamespace

from livekit.protocol import rtc as rtc_pb

from braid.services.media.congestion import CONGESTED_REPORTS, MAX_PAUSE, PROBE_AFTER, LossAdapter
from braid.services.media.forward import DownTrack
from braid.services.media.rtcp import ReportBlock


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


def _reports(down, loss: float, seconds: float, start: float = 0.0, every: float = 1.0) -> None:
    """Receiver reports of a link losing `loss` of 100 packets a second: cumulative counters, as RFC 3550 has them,
    and each report's own fraction of its short interval (often 0: a receiver reports with every NACK)."""
    state = getattr(down, "_test_counters", [0, 0])
    for i in range(round(seconds / every)):
        state[0] += round(100 * every)
        state[1] += round(100 * every * loss)
        down.on_receiver_report(ReportBlock(down.ssrc, 0, state[1], 1000 + state[0], 0, 0, 0), now=start + i * every)
    down._test_counters = state


def test_a_subscriber_cap_follows_its_link(monkeypatch):
    reassigned = []
    layers = [SimpleNamespace(quality=q) for q in range(3)]
    up = SimpleNamespace(clock_rate=90000, video=True, mime="video/VP8", layers=layers,
                         reassign=lambda: reassigned.append(1))
    down = DownTrack(up, send=lambda packet: None, pt=96)
    down.current = layers[2]
    assert down.max_quality == 2
    _reports(down, loss=0.31, seconds=3)
    assert down.max_quality == 1 and reassigned
    down.set_max_quality(0)
    assert down.max_quality == 0, "the subscriber's own wish still applies"


def test_heavy_loss_on_the_lowest_layer_pauses_and_retries_with_backoff():
    adapter = LossAdapter(cap=0)
    assert not adapter.on_report(0.2, 0, now=0.0, lowest=True) and not adapter.on_report(0.2, 0, now=1.0, lowest=True)
    assert not adapter.paused, "loss a lossy link has (below 25 %) does not pause"
    assert not adapter.on_report(0.5, 0, now=2.0, lowest=True)
    assert adapter.on_report(0.5, 0, now=3.0, lowest=True) and adapter.paused
    assert not adapter.resume_due(3.0 + PROBE_AFTER - 0.1) and adapter.resume_due(3.0 + PROBE_AFTER)
    assert not adapter.paused
    resumed = 3.0 + PROBE_AFTER
    adapter.on_report(0.6, 0, now=resumed + 1, lowest=True)
    assert adapter.on_report(0.6, 0, now=resumed + 2, lowest=True) and adapter.paused  # still cannot carry it
    assert not adapter.resume_due(resumed + 2 + PROBE_AFTER), "failing again at once doubles the rest"
    assert adapter.resume_due(resumed + 2 + 2 * PROBE_AFTER)
    assert adapter._pause_for <= MAX_PAUSE
    upper = LossAdapter()
    for t in range(5):
        upper.on_report(0.6, 2, now=float(t), lowest=False)
    assert not upper.paused and upper.cap < 2, "a higher layer steps down instead"


def test_a_stream_the_link_cannot_carry_is_paused_the_subscriber_told_and_resumed_with_a_keyframe():
    keyframes, demand = [], []
    layer = SimpleNamespace(quality=0)
    up = SimpleNamespace(clock_rate=90000, video=True, mime="video/VP8", layers=[layer], reassign=lambda: None,
                         request_keyframe=lambda target, force=False: keyframes.append(target),
                         demand_changed=lambda: demand.append(1))
    down = DownTrack(up, send=lambda packet: None, pt=96)
    down.current = down.target = layer
    told: list[bool] = []
    down.on_stream_state = told.append
    _reports(down, loss=0.0, seconds=2, every=0.05)  # a report with every NACK: their own fractions mean nothing
    assert not down.paused
    _reports(down, loss=0.62, seconds=3, start=2.0, every=0.05)
    assert down.paused and told == [True] and demand
    down.pause()  # the subscriber disables it meanwhile, then enables it: still paused for congestion
    down.resume()
    assert down.paused and told == [True]
    down.tick(down.loss._changed_at + PROBE_AFTER)
    assert not down.paused and told == [True, False]
    assert keyframes and down.waiting_keyframe, "resumes on a keyframe"


def test_the_subscriber_gets_stream_state_updates():
    from braid.services.media.subscriber import Subscriber, Subscription

    sent: list[rtc_pb.SignalResponse] = []
    participant = SimpleNamespace(send=sent.append, __str__=lambda self: "p")
    subscriber = Subscriber.__new__(Subscriber)
    subscriber.p = participant
    sub = Subscription(track=SimpleNamespace(sid="TR_v"), publisher_sid="PA_pub")
    subscriber._stream_state(sub, True)
    subscriber._stream_state(sub, False)
    states = [(i.participant_sid, i.track_sid, i.state) for r in sent for i in r.stream_state_update.stream_states]
    assert states == [("PA_pub", "TR_v", rtc_pb.StreamState.PAUSED), ("PA_pub", "TR_v", rtc_pb.StreamState.ACTIVE)]
