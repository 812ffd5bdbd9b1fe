"""Transport-wide feedback: the wire format both ways, the receiver's bookkeeping for publishers, the numbering of
what subscribers are sent, and hostile input."""

from __future__ import annotations

import random
import struct

from braid.services.media import rtcp, rtp, twcc


def _parse(packet: bytes) -> twcc.Feedback:
    (parsed,) = rtcp.parse(packet)
    assert parsed.type == rtcp.RTPFB and parsed.fmt == twcc.FMT_TWCC and parsed.transport_feedback is not None
    return twcc.parse(parsed.transport_feedback)


def test_feedback_round_trips_small_and_large_deltas_gaps_and_reordering():
    rng = random.Random(3)
    arrivals: list[int | None] = []
    at = 5_000_000
    for i in range(600):
        if rng.random() < 0.15:
            arrivals.append(None)
            continue
        at += rng.choice([rng.randint(0, 60_000), rng.randint(-20_000, 0), rng.randint(70_000, 2_000_000)])
        arrivals.append(at)
    arrivals[0] = arrivals[0] or at
    packet = twcc.build(0x11, 0x22, 7, 65400, arrivals)
    assert len(packet) % 4 == 0
    fb = _parse(packet)
    assert (fb.media_ssrc, fb.base_seq, fb.count, fb.fb_count) == (0x22, 65400, 600, 7)
    assert fb.lost == sum(a is None for a in arrivals)
    want = [((65400 + i) & 0xFFFF, a) for i, a in enumerate(arrivals) if a is not None]
    assert [s for s, _ in fb.arrivals] == [s for s, _ in want]
    base_error = fb.arrivals[0][1] - want[0][1]
    for (_, got), (_, sent) in zip(fb.arrivals, want):
        assert abs(got - sent - base_error) < twcc.DELTA_TICK_US  # quantised, never drifting


def test_long_runs_use_run_length_chunks():
    arrivals = [1000 * i for i in range(500)] + [None] * 300 + [600_000]
    packet = twcc.build(1, 2, 0, 0, arrivals)
    assert len(packet) < 20 + 2 * 10 + 501 + 4  # a few chunks, one byte per received packet
    fb = _parse(packet)
    assert fb.count == 801 and fb.lost == 300 and len(fb.arrivals) == 501


def test_recorder_reports_each_arrival_once_across_the_wrap_and_splits_huge_gaps():
    recorder = twcc.ArrivalRecorder(0x99)
    at = 1_000_000
    sent = {}
    for i in range(120):
        seq = (65500 + i) & 0xFFFF
        at += 2_000 if i != 60 else 20_000_000  # one arrival 20 s after the one before: a second packet
        if i % 7 == 3:
            continue
        recorder.on_packet(seq, 0xAB, at)
        sent[seq] = at
    packets = recorder.feedback()
    assert len(packets) == 2
    got = {}
    for packet in packets:
        fb = _parse(packet)
        assert fb.media_ssrc == 0xAB
        got.update(fb.arrivals)
    assert set(got) == set(sent)
    assert recorder.feedback() == []
    recorder.on_packet((65500 + 125) & 0xFFFF, 0xAB, at + 1000)
    (later,) = recorder.feedback()
    fb = _parse(later)
    assert fb.base_seq == (65500 + 120) & 0xFFFF and fb.lost == 5  # the gap since the last feedback: missing


def test_a_client_jumping_its_numbers_about_keeps_the_recorder_bounded():
    recorder = twcc.ArrivalRecorder(1)
    rng = random.Random(5)
    for i in range(20_000):
        recorder.on_packet(rng.getrandbits(16), 2, i * 10)
        assert len(recorder._pending) <= twcc.ArrivalRecorder.MAX_PENDING
    packets = recorder.feedback()
    assert all(_parse(p) for p in packets)
    assert sum(len(p) for p in packets) < 200_000


def test_malformed_feedback_is_refused_not_raised():
    good = twcc.build(1, 2, 0, 10, [100, 200, None, 50_000])
    body = good[4:]
    for cut in range(len(body)):
        twcc.parse(body[:cut])  # never raises
    assert twcc.parse(body[:15]) is None
    rng = random.Random(9)
    for _ in range(3000):
        junk = struct.pack("!IIHH", 1, 2, rng.getrandbits(16), rng.getrandbits(16)) + rng.randbytes(rng.randint(0, 80))
        fb = twcc.parse(junk)
        if fb is not None:
            assert len(fb.arrivals) <= len(junk)  # a received packet costs at least one byte


def test_stamped_adds_one_element_to_whichever_extension_form_the_packet_has():
    plain = rtp.rewrite(0x80, 1, 96, 5, 6, 7, b"payload")
    one = twcc.stamped(plain, 3, 0x1234)
    assert twcc.transport_seq(one, 3) == 0x1234 and one.endswith(b"payload") and rtp.parse(one)[5] == 20
    with_dd = rtp.with_extension(0x80, 1, 96, 5, 6, 7, 1, b"\x01\x02\x03") + b"payload"
    both = twcc.stamped(with_dd, 3, 0x0102)
    assert rtp.extensions(both) == {1: b"\x01\x02\x03", 3: b"\x01\x02"} and both.endswith(b"payload")
    two_byte = rtp.with_extension(0x80, 1, 96, 5, 6, 7, 1, bytes(20)) + b"payload"
    stamped = twcc.stamped(two_byte, 3, 9)
    assert rtp.extensions(stamped) == {1: bytes(20), 3: b"\x00\x09"} and twcc.transport_seq(stamped, 3) == 9
    odd_profile = plain[:1] + plain[1:12]
    odd = bytes([0x90]) + odd_profile[1:] + struct.pack("!HH", 0xABCD, 0) + b"x"
    assert twcc.stamped(odd, 3, 1) is None
    assert twcc.stamped(bytes([0x90]) + plain[1:12] + b"\xbe\xde\x00\x09", 3, 1) is None  # truncated block


def test_sent_packets_number_in_order_and_forget_what_the_ring_overwrote():
    sent = twcc.SentPackets(2)
    packet = rtp.rewrite(0x80, 0, 96, 1, 1, 1, bytes(100))
    for i in range(twcc.SentPackets.RING + 10):
        out = sent.stamp(packet, 1000 + i)
        assert twcc.transport_seq(out, 2) == i & 0xFFFF
    assert sent.sent(5) is None  # overwritten by 4096 + 5
    assert sent.sent(twcc.SentPackets.RING + 5) == (1000 + twcc.SentPackets.RING + 5, len(packet) + 8)

