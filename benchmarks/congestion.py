"""`make bench`, congestion control: the CPU that transport-wide feedback costs, per packet and per subscriber.

Measured in this process on synthetic traffic (no network): a subscriber receiving 500 packets/s (the forwarding
benchmark's 50 audio + 450 video) whose client reports every 100 ms, through the node's own code:
  * feedback in: parsing one feedback packet, looking up its 50 packets' send times and grouping them for the
    delay trend (bwe.ArrivalDelay in Python, bwe.CompiledArrivalDelay in C), the rate control (bwe.SendSideBwe)
    and the allocator (allocation.LinkAllocator, 3 streams);
  * feedback out, per publisher packet: reading its transport-wide number, recording its arrival, and its share of
    the 10 feedback packets a second that go back (twcc.ArrivalRecorder);
  * numbering on the send path, per forwarded packet: twcc.stamped in Python, and the compiled Output with and
    without transport-wide numbers.

    python -m benchmarks.congestion [--seconds 20]
"""

from __future__ import annotations

import argparse
import random
import socket
import time

from braid.services.media import fastpath, rtp, twcc
from braid.services.media.allocation import Demand, LinkAllocator
from braid.services.media.bwe import SendSideBwe

PPS = 500
FEEDBACK_HZ = 10


class _Stream:
    def __init__(self, rates: list[float]):
        self.rates, self.video, self.send_bps, self.priority = rates, True, 0.0, 1

    def demand(self, now: float) -> Demand:
        return Demand(self, self.priority, self.rates, list(range(len(self.rates))), self.rates[-1])

    def fit_to(self, quality: int, now: float) -> None:
        pass


def _cpu(fn, repeat: int) -> float:
    """CPU seconds per call of fn()."""
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


def _traffic(seconds: float) -> list[tuple[int, int]]:
    """(send µs, size) of the forwarding benchmark's stream: 30 video frames a second of 15 packets sent in a
    burst, and an audio packet every 20 ms."""
    packets = [(int(f * 1e6 / 30) + k * 60, 1100) for f in range(int(seconds * 30)) for k in range(15)]
    packets += [(a * 20_000 + 7_000, 120) for a in range(int(seconds * 50))]
    return sorted(packets)


def feedback_in(seconds: float, compiled: bool) -> tuple[float, float]:
    """µs per reported packet, and µs of CPU per subscriber per second; `compiled`: parsed, matched and grouped in
    C. Each feedback is measured with what it reports still in the ring, as on a real transport."""
    sent = twcc.SentPackets(3)
    recorder = twcc.ArrivalRecorder(1)
    bwe = SendSideBwe(compiled=compiled)
    allocator = LinkAllocator()
    streams = [_Stream([150_000, 500_000, 1_200_000]), _Stream([150_000, 500_000, 1_200_000]), _Stream([40_000])]
    rng = random.Random(1)
    bodies = {size: rtp.rewrite(0x80, 0, 96, 1, 1, 1, bytes(size)) for size in (1100, 120)}
    cpu = 0.0
    next_feedback, link_free = 100_000, 0
    for at, size in _traffic(seconds):
        out = sent.stamp(bodies[size], at)
        link_free = max(link_free, at) + len(out) * 8 // 20  # a 20 Mbit/s link
        if rng.random() > 0.01:
            recorder.on_packet(twcc.transport_seq(out, 3), 2, link_free + 20_000 + rng.randint(0, 300))
        if at < next_feedback:
            continue
        next_feedback += 1_000_000 // FEEDBACK_HZ
        for packet in recorder.feedback():
            body = packet[4:]
            start = time.process_time()
            bwe.on_transport_feedback(body, sent, at)
            allocator.update(bwe.estimate, bwe.congested(at), streams, at / 1e6)  # type: ignore[arg-type]
            cpu += time.process_time() - start
    per_second = cpu / seconds
    return per_second / PPS * 1e6, per_second * 1e6


def feedback_out(seconds: float) -> tuple[float, int]:
    """µs per publisher packet: reading its number, recording its arrival, and its share of the feedback sent
    every 100 ms; and how many feedback packets that was."""
    recorder = twcc.ArrivalRecorder(1)
    packets = [twcc.stamped(rtp.rewrite(0x80, 0, 96, i, i, 7, bytes(900)), 3, i & 0xFFFF) for i in range(PPS)]
    total = int(seconds * PPS)
    per_feedback = PPS // FEEDBACK_HZ
    built = 0
    start = time.process_time()
    for i in range(total):
        twcc.transport_seq(packets[i % PPS], 3)  # (the packets repeat: the recorder is given the running number)
        recorder.on_packet(i & 0xFFFF, 7, i * 2000)
        if i % per_feedback == per_feedback - 1:
            built += len(recorder.feedback())
    return (time.process_time() - start) / total * 1e6, built


def numbering(count: int) -> tuple[float, float | None, float | None]:
    """µs per packet: Python twcc.stamped; compiled Output.send (protect, queue, a sendmmsg per 200) without and
    with transport-wide numbers."""
    packet = rtp.rewrite(0x80, 0, 96, 1, 1, 1, bytes(1000))
    python = _cpu(lambda: twcc.stamped(packet, 3, 7), count) * 1e6
    if fastpath.UNAVAILABLE:
        return python, None, None
    from braid.services.media.fastpath import _fastpath

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batch = _fastpath.Batch(256)
    out = _fastpath.Output(batch, _fastpath.SrtpContext(bytes(30), 1), tx.fileno(), "127.0.0.1", rx.getsockname()[1])
    seq = [0]

    def send() -> None:
        seq[0] = (seq[0] + 1) & 0xFFFF
        out.send(packet[:2] + seq[0].to_bytes(2, "big") + packet[4:])
        if batch.count >= 200:
            batch.flush()

    try:
        plain = _cpu(send, count) * 1e6
        sent = twcc.SentPackets(3)
        out.set_twcc(3, sent.ring)
        numbered = _cpu(send, count) * 1e6
    finally:
        rx.close()
        tx.close()
    return python, plain, numbered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.congestion", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of synthetic traffic per measurement")
    args = parser.parse_args(argv)
    feedback = {"Python": feedback_in(args.seconds, compiled=False)}
    if not fastpath.UNAVAILABLE:
        feedback["compiled"] = feedback_in(args.seconds, compiled=True)
    recording, built = feedback_out(args.seconds)
    python, plain, numbered = numbering(int(args.seconds * PPS * 4))
    print()
    print(f"Congestion control CPU (this process, {args.seconds:g} s of synthetic traffic at {PPS} packets/s, "
          f"feedback every {1000 // FEEDBACK_HZ} ms):")
    for how, (per_packet, per_subscriber) in feedback.items():
        print(f"  subscriber feedback in (parse + estimate + allocate), {how} estimator: {per_packet:.2f} us per "
              f"reported packet, {per_subscriber:.0f} us of CPU per subscriber per second "
              f"({per_subscriber / 1e4:.2f} % of a core)")
    print(f"  publisher feedback out: {recording:.2f} us per received packet, its {built} feedback packets included")
    line = f"  numbering what is sent: Python {python:.2f} us per packet"
    if plain is not None and numbered is not None:
        line += (f"; compiled Output.send {plain:.2f} us without, {numbered:.2f} us with "
                 f"(+{numbered - plain:.2f} us per forwarded packet)")
    print(line)


if __name__ == "__main__":
    main()
