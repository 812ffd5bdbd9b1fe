"""The compiled per-packet estimator (fastpath/_twcc.c) against the Python reference (bwe.ArrivalDelay): fed the
same transport-wide feedback, every field of the two must stay equal, and so must the estimates built on them."""

from __future__ import annotations

import random
import struct

import pytest

from braid.services.media import bwe, fastpath, rtp, twcc

pytestmark = pytest.mark.skipif(bool(fastpath.UNAVAILABLE), reason="the compiled extension is not built")


def _assert_same(reference: bwe.ArrivalDelay, compiled: bwe.CompiledArrivalDelay, context: str) -> None:
    want, got = reference.snapshot(), compiled.snapshot()
    assert got == want, context
    assert compiled.state == reference.state and compiled.acked_bps() == reference.acked_bps(), context


def test_any_feedback_is_matched_and_measured_as_python_does():
    """Feedback that reports packets the ring forgot or never sent, wraps its numbers, has negative references
    and deltas (times wrap mod 2^32), is truncated or is junk: the same packets matched and lost, and the same
    state after each one."""
    rng = random.Random(15)
    sent = twcc.SentPackets(2)
    packet = rtp.rewrite(0x80, 0, 96, 1, 1, 1, bytes(300))
    for i in range(70_000):  # numbers wrap; the ring keeps the last 4096
        sent.stamp(packet[:rng.randint(20, len(packet))], (2**32 - 50_000 + i * 997) & 0xFFFFFFFF)
    bodies = []
    for _ in range(400):
        base = rng.getrandbits(16) if rng.random() < 0.3 else (70_000 - rng.randint(0, 5000)) & 0xFFFF
        at = rng.randint(0, 2**24 * 64_000 - 1)
        arrivals = []
        for _ in range(rng.randint(1, 300)):
            at += rng.choice((250, 1000, 20_000, 3_000_000, -4000, -40_000))
            arrivals.append(max(at, 0) if rng.random() > 0.1 else None)
        arrivals[0] = arrivals[0] if arrivals[0] is not None else at
        try:
            body = twcc.build(1, 2, rng.getrandbits(8), base, arrivals)[4:]
        except ValueError:
            continue  # a gap no feedback can carry: the recorder splits there
        bodies += [body, body[:rng.randint(0, len(body))]]
    bodies += [struct.pack("!IIHH", 1, 2, rng.getrandbits(16), rng.getrandbits(16)) + rng.randbytes(rng.randint(0, 90))
               for _ in range(3000)]
    negative = bytearray(bodies[0])
    negative[12:15] = b"\xff\xff\xf0"  # a reference time below zero
    bodies.append(bytes(negative))
    rng.shuffle(bodies)
    reference, compiled = bwe.ArrivalDelay(), bwe.CompiledArrivalDelay()
    _assert_same(reference, compiled, "fresh")
    matched = 0
    for i, body in enumerate(bodies):
        want = reference.measure(body, sent)
        assert compiled.measure(body, sent) == want, body.hex()
        _assert_same(reference, compiled, f"after body {i}: {body.hex()}")
        matched += bool(want and want[0])
    assert matched > 200  # most built ones report packets the ring knows


def test_a_queue_building_up_is_detected_the_same_way_and_gives_the_same_estimate():
    """A realistic link: 30 fps frames in bursts and audio between them through a bottleneck that first carries
    everything and then half of it, reported every 100 ms with a little loss: both estimators see the queue at
    the same feedback and end at the same estimate, bit for bit."""
    rng = random.Random(3)
    sent = twcc.SentPackets(3)
    recorder = twcc.ArrivalRecorder(1)
    python, c = bwe.SendSideBwe(), bwe.SendSideBwe(compiled=True)
    assert isinstance(c.delay, bwe.CompiledArrivalDelay)
    packet = rtp.rewrite(0x80, 0, 96, 1, 1, 1, bytes(1100))
    audio = rtp.rewrite(0x80, 0, 111, 1, 1, 2, bytes(90))
    t, busy, next_feedback = 1_000_000.0, 0.0, 1_100_000.0
    states = set()
    while t < 21_000_000:
        capacity = 4_000_000 if t < 11_000_000 else 1_200_000  # bits/s
        frame = [packet] * 8 + ([audio] if int(t) % 20_000 < 33_334 else [])
        for p in frame:
            out = sent.stamp(p, int(t))
            busy = max(busy, t) + len(out) * 8 / capacity * 1e6
            if rng.random() > 0.02:
                recorder.on_packet(twcc.transport_seq(out, 3), 2, int(busy + 15_000 + rng.random() * 500))
            t += 40
        t += 33_333 - 40 * len(frame)
        if t >= next_feedback:
            for feedback in recorder.feedback():
                body = feedback[4:]
                assert python.on_transport_feedback(body, sent, int(t)) == c.on_transport_feedback(body, sent, int(t))
                _assert_same(python.delay, c.delay, f"at {t:.0f} us")
                assert (c.estimate, c.loss_bps, c.congested(int(t))) == (
                    python.estimate, python.loss_bps, python.congested(int(t)))
                states.add(c.state)
            next_feedback += 100_000
    assert bwe.OVERUSING in states  # the squeeze was seen
    assert 0 < c.estimate < 1_600_000


def test_the_acked_window_holds_at_most_its_limit_in_both():
    """A client reporting far more packets than a link carries in the window (5,000 within 100 ms) fills neither
    estimator past ACKED_MAX; both forget the oldest, the same ones."""
    sent = twcc.SentPackets(3)
    recorder = twcc.ArrivalRecorder(1)
    reference, compiled = bwe.ArrivalDelay(), bwe.CompiledArrivalDelay()
    packet = rtp.rewrite(0x80, 0, 96, 1, 1, 1, bytes(200))
    for burst in range(5):
        for i in range(1000):
            at = burst * 20_000 + i * 20
            recorder.on_packet(twcc.transport_seq(sent.stamp(packet, at), 3), 2, at + 10_000)
        for feedback in recorder.feedback():
            assert compiled.measure(feedback[4:], sent) == reference.measure(feedback[4:], sent)
            _assert_same(reference, compiled, f"burst {burst}")
    assert reference.snapshot()["acked"] == compiled.snapshot()["acked"] == bwe.ArrivalDelay.ACKED_MAX


def test_a_state_of_the_wrong_size_is_refused():
    sent = twcc.SentPackets(3)
    with pytest.raises(ValueError):
        fastpath._fastpath.twcc_feed(b"\x00" * 20, sent.ring, bytearray(10))
    with pytest.raises(ValueError):
        fastpath._fastpath.twcc_feed(b"\x00" * 20, bytearray(8), bytearray(fastpath._fastpath.DELAY_STATE_SIZE))
