"""Loss in a subscriber's receiver reports caps its simulcast layer; clean reports lift the cap again; heavy loss
on the lowest layer pauses the stream, and the subscriber is told."""

import asyncio
from types import SimpleNamespace

from livekit.protocol import rtc as rtc_pb

from braid.services.media.congestion import (
    CONGESTED_REPORTS, MAX_PAUSE, MAX_PROBE_AFTER, PROBE_AFTER, PROBE_LOSS, PROBE_QUEUEING, PROBE_STAGE, LossAdapter,
    Prober,
)
from braid.services.media.downtrack import DownTrack
from braid.services.media.rtcp import ReportBlock


def test_sustained_loss_steps_down_one_layer_below_the_current_one():
    adapter = LossAdapter()
    assert not adapter.on_report(0.3, current_quality=2, now=0.0), "one bad report is not enough"
    assert adapter.on_report(0.3, current_quality=2, now=1.0) and adapter.cap == 1
    for i in range(CONGESTED_REPORTS):
        changed = adapter.on_report(0.25, current_quality=1, now=2.0 + i)
    assert changed and adapter.cap == 0
    assert not adapter.on_report(0.5, current_quality=0, now=5.0), "nothing below the lowest layer"


def test_clean_reports_probe_the_link_before_raising_the_cap_one_layer_at_a_time():
    """(A receiver that gives no round-trip times: the probe's stages follow the clock.)"""
    adapter = LossAdapter(cap=0)
    assert not adapter.on_report(0.0, 0, now=0.0)
    assert not adapter.on_report(0.0, 0, now=PROBE_AFTER - 1)
    start = PROBE_AFTER
    assert adapter.on_report(0.0, 0, now=start) and adapter.probing_since == start and adapter.cap == 0
    assert adapter.probe_fraction(start + 1) == 0.5, "half the extra rate first"
    assert not adapter.on_report(0.0, 0, now=start + PROBE_STAGE)
    assert adapter.probe_fraction(start + PROBE_STAGE) == 1.0
    assert adapter.on_report(0.0, 0, now=start + 2 * PROBE_STAGE) and adapter.cap == 1
    assert adapter.probing_since is None and adapter.probe_fraction(start + 2 * PROBE_STAGE) == 0.0
    assert not adapter.on_report(0.0, 1, now=start + 2 * PROBE_STAGE + 1), "each step waits again"


def test_a_probe_goes_on_while_round_trips_show_no_queue_and_fails_when_one_builds():
    adapter = LossAdapter(cap=0)
    adapter.on_report(0.0, 0, now=0.0)
    assert not adapter.on_rtt(0.020, now=0.5)
    start = PROBE_AFTER
    assert adapter.on_report(0.0, 0, now=start) and adapter.probing_since == start
    assert not adapter.on_rtt(0.030, now=start + 1) and adapter.probe_fraction(start + 1) == 0.5
    assert not adapter.on_rtt(0.030, now=start + PROBE_STAGE) and adapter.probe_fraction(start + PROBE_STAGE) == 1
    assert not adapter.on_report(0.0, 0, now=start + PROBE_STAGE + 1)
    assert not adapter.on_report(0.0, 0, now=start + 2 * PROBE_STAGE), "no round trip well into the full rate yet"
    assert not adapter.on_rtt(0.025, now=start + 2 * PROBE_STAGE + 0.1)
    assert adapter.on_report(0.0, 0, now=start + 2 * PROBE_STAGE + 0.2) and adapter.cap == 1

    start += 2 * PROBE_STAGE + 0.2 + PROBE_AFTER
    assert not adapter.on_rtt(0.020, now=start - 1)
    assert adapter.on_report(0.0, 1, now=start) and adapter.probing_since == start
    assert adapter.on_rtt(0.020 + PROBE_QUEUEING + 0.01, now=start + 0.8), "a queue builds"
    assert adapter.probing_since is None and adapter.cap == 1
    assert adapter._probe_after == 2 * PROBE_AFTER
    failed = start + 0.8
    assert not adapter.on_report(0.0, 1, now=failed + 0.5)
    assert not adapter.on_report(0.0, 1, now=failed + PROBE_AFTER), "twice as long now"
    again = failed + 0.5 + 2 * PROBE_AFTER
    assert not adapter.on_report(0.0, 1, now=again - 0.1), "not while the queue drains"
    assert not adapter.on_rtt(0.022, now=again - 0.05)
    assert adapter.on_report(0.0, 1, now=again) and adapter.probing_since
    assert adapter.on_report(PROBE_LOSS + 0.01, 1, now=again + 1) and adapter.cap == 1, "a probe losing packets"
    assert adapter._probe_after == 4 * PROBE_AFTER
    for _ in range(10):
        adapter._probe_after = min(MAX_PROBE_AFTER, adapter._probe_after * 2)
    assert adapter._probe_after == MAX_PROBE_AFTER


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
    up = SimpleNamespace(track_sid="TR_t", clock_rate=90000, video=True, mime="video/VP8", layers=layers,
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
    up = SimpleNamespace(track_sid="TR_t", clock_rate=90000, video=True, mime="video/VP8", layers=[layer],
                         reassign=lambda: None,
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


async def test_probe_padding_takes_its_own_sequence_numbers_and_is_never_resent():

    from braid.services.media import rtp
    from braid.services.media.forward import UpTrack

    up = UpTrack("TR_a", "audio", "audio/opus", 48000, 111, None, lambda ssrc: None, lambda ssrc, seqs: None)
    layer = up.add_layer(5)
    sent: list[bytes] = []
    down = DownTrack(up, sent.append, pt=111)
    up.add_down(down)

    def feed(seq: int) -> None:
        packet = rtp.HEADER.pack(0x80, 0x80 | 111, seq, seq * 960, 5) + b"opus-%d" % seq  # marked: padding may follow
        up.on_packet(layer, packet, rtp.parse(packet))

    for seq in (100, 101, 102):
        feed(seq)
    first = rtp.parse(sent[0])[2]
    down.send_padding(4, 255)
    feed(103)
    seqs = [(rtp.parse(p)[2] - first) & 0xFFFF for p in sent]
    assert seqs == list(range(8))
    padding = sent[3:7]
    assert all(p[0] & 0x20 and len(p) == 12 + 255 and p[-1] == 255 and rtp.parse(p)[5] == rtp.parse(p)[6]
               for p in padding), "padding only"
    sent.clear()
    down.on_nack([(first + 1) & 0xFFFF, (first + 4) & 0xFFFF, (first + 7) & 0xFFFF])
    assert [p[12:] for p in sent] == [b"opus-101", bytes([0, 0, 0, 4]), b"opus-103"]  # lost padding: padding again
    resent = rtp.parse(sent[1])
    assert sent[1][0] & 0x20 and resent[2] == (first + 4) & 0xFFFF and resent[5] == resent[6]

    sent.clear()
    share = [0.5]
    prober = Prober(down.send_padding, rate_bps=400_000, fraction=lambda: share[0])
    await asyncio.sleep(0.3)
    half = len(sent)
    share[0] = 1.0
    await asyncio.sleep(0.3)
    prober.stop()
    full = len(sent) - half
    await asyncio.sleep(0.1)
    assert len(sent) == half + full, "stopped"
    expected = 400_000 / 8 * 0.3 / 255  # packets at the whole rate in 0.3 s
    assert 0.3 * expected <= half <= 0.8 * expected and 0.7 * expected <= full <= 1.5 * expected, (half, full)


async def test_probe_padding_waits_for_the_end_of_a_frame():
    """A receiver assembles a frame from consecutive sequence numbers: padding between two of its packets would
    leave it unassembled for good (libwebrtc holds the later pictures until it asks for a keyframe, after 3 s), so
    a probe's padding goes out only after a frame's last packet, and what it could not send stays owed."""
    from braid.services.media import rtp
    from braid.services.media.forward import UpTrack

    up = UpTrack("TR_v", "video", "video/H264", 90000, 102, None, lambda ssrc: None, lambda ssrc, seqs: None)
    layer = up.add_layer(7)
    sent: list[bytes] = []
    down = DownTrack(up, sent.append, pt=102)
    up.add_down(down)

    def feed(seq: int, last: bool, payload: bytes = b"\x41slice") -> None:
        packet = rtp.HEADER.pack(0x80, last << 7 | 102, seq, 3000 * (seq // 3), 7) + payload
        up.on_packet(layer, packet, rtp.parse(packet))

    feed(300, False, bytes([0x65]) + b"idr")
    assert not down.send_padding(2, 255), "inside the keyframe"
    prober = Prober(down.send_padding, rate_bps=400_000)
    await asyncio.sleep(0.1)
    assert len(sent) == 1, "nothing while the frame is open"
    feed(301, False)
    feed(302, True)
    await asyncio.sleep(0.05)
    prober.stop()
    feed(303, False)
    kinds = ["pad" if p[0] & 0x20 else "media" for p in sent]
    assert kinds[:3] == ["media"] * 3 and kinds[-1] == "media" and set(kinds[3:-1]) == {"pad"}
    assert len(kinds) - 4 >= 10, "the padding owed while it waited went out at once"
    seqs = [rtp.parse(p)[2] for p in sent]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:]))


async def test_a_subscriber_link_is_probed_by_one_stream_at_a_time():
    from braid.services.media.congestion import LinkProbes

    link = LinkProbes()
    downs = []
    for _ in range(2):
        layers = [SimpleNamespace(quality=q, bitrate=150_000.0 * (q + 1)) for q in range(3)]
        up = SimpleNamespace(track_sid="TR_t", clock_rate=90000, video=True, mime="video/VP8", layers=layers,
                             reassign=lambda: None, remove_down=lambda down: None)
        down = DownTrack(up, send=lambda packet: None, pt=96)
        down.current, down.link_probes = layers[0], link
        down.loss.cap = 0
        downs.append(down)
    for t in range(int(PROBE_AFTER) + 2):
        for down in downs:
            _reports(down, loss=0.0, seconds=1, start=float(t))
    probing = [d for d in downs if d.prober is not None]
    assert len(probing) == 1 and link.holder is probing[0]
    waiting = next(d for d in downs if d.prober is None)
    assert waiting.loss.probing_since is None and waiting.loss.cap == 0
    probing[0].close()
    assert link.holder is None and probing[0].prober is None


async def test_a_stream_of_higher_priority_takes_the_link_probe_from_a_lower_one():
    """Probes go in priority order, as the allocator fits streams: a screen share waiting behind a camera's probe
    would stay on its low layer for as long as the camera's probe takes, and longer if the camera goes first again."""
    from braid.services.media.congestion import LinkProbes

    link = LinkProbes()
    downs = []
    for priority in (1, 255):
        layers = [SimpleNamespace(quality=q, bitrate=150_000.0 * (q + 1)) for q in range(3)]
        up = SimpleNamespace(track_sid=f"TR_{priority}", clock_rate=90000, video=True, mime="video/VP8",
                             layers=layers, reassign=lambda: None, remove_down=lambda down: None)
        down = DownTrack(up, send=lambda packet: None, pt=96)
        down.current, down.link_probes, down.priority = layers[0], link, priority
        down.loss.cap = 0
        downs.append(down)
    camera, screen = downs
    for t in range(int(PROBE_AFTER) + 2):
        _reports(camera, loss=0.0, seconds=1, start=float(t))
    assert link.holder is camera and camera.prober is not None
    for t in range(int(PROBE_AFTER) + 2):
        _reports(screen, loss=0.0, seconds=1, start=float(t))
    assert link.holder is screen and screen.prober is not None
    assert camera.prober is None and camera.loss.probing_since is None and camera.loss.cap == 0
    _reports(camera, loss=0.0, seconds=1, start=PROBE_AFTER + 2)
    assert link.holder is screen and camera.prober is None, "the lower priority waits its turn"
    for down in downs:
        down.close()
    assert link.holder is None


def test_loss_right_after_a_step_down_is_the_queue_draining_not_a_reason_to_pause():
    """The reports that follow a step-down still count the queue the higher layer built: pausing on them froze
    a browser that the lower layer would have served."""
    adapter = LossAdapter()
    adapter.lower_cap(0, now=100.0)
    for t in (100.5, 101.5, 102.5):
        assert not adapter.on_report(0.5, 0, now=t, lowest=True)
    assert not adapter.paused
    adapter.on_report(0.5, 0, now=103.5, lowest=True)
    assert adapter.on_report(0.5, 0, now=104.5, lowest=True) and adapter.paused  # still heavy: it cannot carry it


def test_a_packet_due_before_padding_keeps_its_number():
    """A packet the publisher sent before a probe's padding but that arrives after it (reordered, or its
    retransmission) takes the number it had, not one shifted by the padding: shifted, it landed on a later
    packet's number, the one it stood for never came, and the subscriber froze until the next keyframe (the
    compiled fan-out hands such packets to this Python path: tests/test_fastpath.py)."""
    from braid.services.media import rtp
    from braid.services.media.forward import UpTrack

    up = UpTrack("TR_v", "video", "video/H264", 90000, 102, None, lambda ssrc: None, lambda ssrc, seqs: None)
    layer = up.add_layer(7)
    sent: list[bytes] = []
    down = DownTrack(up, sent.append, pt=102)
    up.add_down(down)
    keyframe = bytes([0x65]) + b"idr"

    def feed(seq: int, payload: bytes = b"\x41slice") -> None:
        packet = rtp.HEADER.pack(0x80, (seq % 2) << 7 | 102, seq, 3000 * (seq // 2), 7) + payload + b"%d" % seq
        up.on_packet(layer, packet, rtp.parse(packet))

    feed(200, keyframe)
    feed(201)
    feed(203)  # 202 is late
    first = rtp.parse(sent[0])[2]
    down.send_padding(3, 255)
    feed(202)
    feed(204)
    numbers = {p[-3:]: (rtp.parse(p)[2] - first) & 0xFFFF for p in sent if rtp.parse(p)[5] < rtp.parse(p)[6]}
    assert numbers == {b"200": 0, b"201": 1, b"203": 3, b"202": 2, b"204": 7}
    assert [(rtp.parse(p)[2] - first) & 0xFFFF for p in sent if rtp.parse(p)[5] == rtp.parse(p)[6]] == [4, 5, 6]
    assert down.original_seq((first + 2) & 0xFFFF) == 202 and down.original_seq((first + 7) & 0xFFFF) == 204
