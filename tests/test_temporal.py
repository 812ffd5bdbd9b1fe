"""VP8 temporal layers without a server: a subscriber asking for fewer frames a second (track_setting fps) gets
the fewest temporal layers that reach it, numbered without gaps in sequence numbers or picture ids, back at full
rate from a layer-sync picture; resends and late packets keep their numbers. The browser end-to-end test is
tests/test_cluster_simulcast.py."""

from __future__ import annotations

import pytest

from braid.services.media import rtp, temporal
from braid.services.media.downtrack import Vp8DownTrack
from braid.services.media.forward import UpTrack
from braid.services.media.temporal import PictureRates, SeqMap

SSRC = 2000
PATTERN = [0, 2, 1, 2]  # libwebrtc's L1T3: layer sync on the first picture of each upper layer after a base one


def vp8(pid: int, tl0: int, tid: int, sync: bool, begins: bool, key: bool = False) -> bytes:
    """A VP8 payload descriptor with a 15-bit picture id, TL0PICIDX and TID/Y, as Chrome sends, and a frame tag."""
    descriptor = bytes([0x80 | (0x10 if begins else 0), 0xE0, 0x80 | (pid >> 8), pid & 0xFF, tl0,
                        (tid << 6) | (0x20 if sync else 0)])
    return descriptor + (bytes([0x00 if key else 0x01, 0x9D]) if begins else b"\x55\x66")


class Stream:
    """A publisher's VP8 layer at 30 fps in PATTERN, two packets a picture, and viewers of it."""

    def __init__(self, clock: list[float]):
        self.clock = clock
        self.up = UpTrack("TR_v", "video", "video/VP8", 90000, 96, 97, request_keyframe=lambda s: None,
                          request_nack=lambda s, q: None)
        self.layer = self.up.add_layer(SSRC)
        self.seq, self.pid, self.tl0, self.ts, self.index = 1000, 32760, 250, 0, 0
        self.sent: dict[int, bytes] = {}

    def viewer(self) -> tuple[Vp8DownTrack, list[bytes]]:
        out: list[bytes] = []
        down = Vp8DownTrack(self.up, out.append, pt=100, ssrc=555)
        self.up.add_down(down)
        return down, out

    def picture(self, key: bool = False, hold: bool = False) -> list[bytes]:
        """The next picture's packets (fed to the viewers unless `hold`)."""
        if key:
            self.index = 0
        tid = PATTERN[self.index % 4]
        if tid == 0 and not key:
            self.tl0 = (self.tl0 + 1) & 0xFF
        sync = tid > 0 and self.index % 4 in (1, 2)
        packets = []
        for part in range(2):
            payload = vp8(self.pid, self.tl0, tid, sync, part == 0, key)
            packets.append(rtp.HEADER.pack(0x80, (part << 7) | 96, self.seq, self.ts, SSRC) + payload)
            self.sent[self.seq] = packets[-1]
            self.seq = (self.seq + 1) & 0xFFFF
        self.pid = (self.pid + 1) & 0x7FFF
        self.ts += 3000
        self.index += 1
        self.clock[0] += 1 / 30
        if not hold:
            for packet in packets:
                self.feed(packet)
        return packets

    def feed(self, packet: bytes) -> None:
        self.up.on_packet(self.layer, packet, rtp.parse(packet))


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(temporal.time, "monotonic", lambda: now[0])
    return now


def described(out: list[bytes]) -> list[tuple[int, int, int, int]]:
    """(sequence number, picture id, TL0PICIDX, TID) of each packet sent."""
    got = []
    for packet in out:
        ids = rtp.vp8_ids(packet[12:])
        got.append((rtp.parse(packet)[2], ids.picture_id, ids.tl0, ids.temporal))
    return got


def consecutive(values: list[int], mask: int) -> bool:
    return all((b - a) & mask == 1 for a, b in zip(values, values[1:]))


def test_picture_rates_per_temporal_layer_and_the_layer_for_an_fps():
    rates = PictureRates()
    for i in range(61):
        rates.count(PATTERN[i % 4], key=i, now=i / 30)
        rates.count(PATTERN[i % 4], key=i, now=i / 30)  # a second subscriber asking: counted once
    assert rates.fps == pytest.approx([7.5, 15, 30], abs=0.6)
    assert (rates.layers_for(0), rates.layers_for(7), rates.layers_for(15), rates.layers_for(24)) == (2, 0, 1, 2)
    assert rates.layers_for(60) == 2  # more than there is: everything


def test_seq_map_numbers_picture_ids_in_their_width():
    pictures = SeqMap(64, 15)
    pictures.restart(0x7FFE, 0x7FFF)
    assert [pictures.send(p) for p in (0x7FFE, 0x7FFF)] == [0x7FFF, 0]
    pictures.drop(0)
    assert pictures.send(1) == 1 and pictures.newer(2) and not pictures.newer(1)


@pytest.mark.parametrize("bits", [16, 15, 7])
def test_seq_map_keeps_late_numbers_however_long_it_runs(bits):
    """The oldest number a late packet may still have trails the newest: fixed at the first one, everything late
    looked older than it once half the number space had gone by (64 pictures, for 7-bit picture ids)."""
    wrap = (1 << bits) - 1
    seqs = SeqMap(64, bits)
    seqs.restart(5, 900)
    for i in range(3 * (wrap + 1)):
        seqs.send((5 + i) & wrap)
    newest = (5 + 3 * (wrap + 1) - 1) & wrap
    late = (newest - 3) & wrap
    assert seqs.sent_as(late) == (seqs.next_out - 4) & wrap
    assert seqs.send(late) == (seqs.next_out - 4) & wrap


def test_a_viewer_asking_for_fewer_frames_gets_the_lower_temporal_layers_without_gaps(clock):
    """Asking for 15 fps of a 30 fps L1T3 stream: layers 0 and 1, once the rates are measured, with consecutive
    sequence numbers and picture ids across what it leaves out (the picture ids wrap) and TL0PICIDX as sent; a
    viewer asking for nothing gets every picture, through the same class."""
    stream = Stream(clock)
    half, to_half = stream.viewer()
    full, to_full = stream.viewer()
    stream.picture(key=True)
    half.set_max_fps(15)
    assert half.python_only and not full.python_only
    for i in range(79):
        if i == 39:
            mark = len(to_half)  # the last 40 pictures: the rates are known by then
        stream.picture()
    assert len(to_full) == 160
    got = described(to_half)
    late = got[mark:]
    assert {tid for *_, tid in late} == {0, 1} and len(late) == 2 * 20
    assert consecutive([s for s, *_ in got], 0xFFFF)
    pids = [pid for _, pid, *_ in got[::2]]
    assert consecutive(pids, 0x7FFF) and pids[0] == 32760 and 0 in pids
    first_ts = {id(out): rtp.parse(out[0])[3] for out in (to_half, to_full)}
    tl0_at = {(rtp.parse(p)[3] - first_ts[id(to_full)]) & 0xFFFFFFFF: tl0 for p, (*_, tl0, _) in
              zip(to_full, described(to_full))}
    assert all(tl0_at[(rtp.parse(p)[3] - first_ts[id(to_half)]) & 0xFFFFFFFF] == tl0
               for p, (*_, tl0, _) in zip(to_half, got))  # base-layer numbering as the publisher's


def thinned(clock: list[float], fps: float, pictures: int) -> tuple[Stream, Vp8DownTrack, list[bytes]]:
    """A viewer asking for `fps` from a keyframe on, `pictures` pictures later."""
    stream = Stream(clock)
    down, out = stream.viewer()
    stream.picture(key=True)
    down.set_max_fps(fps)
    for _ in range(pictures):
        stream.picture()
    return stream, down, out


def test_back_to_full_rate_at_a_layer_sync_picture_then_plain_forwarding(clock):
    stream, down, out = thinned(clock, 7, 60)
    assert {tid for *_, tid in described(out)[-10:]} == {0}
    while stream.index % 4 != 3:
        stream.picture()
    down.set_max_fps(0)
    mark = len(out)
    for _ in range(6):  # TL2 without layer sync (still left out), then TL0, TL2 with sync: everything from there
        stream.picture()
    assert [tid for *_, tid in described(out[mark:])[::2]] == [0, 2, 1, 2, 0]
    got = described(out)
    assert consecutive([s for s, *_ in got], 0xFFFF) and consecutive([p for _, p, *_ in got[::2]], 0x7FFF)
    assert not down.python_only and down.thinning is None  # handed back to plain forwarding (in C when compiled)
    stream.picture()
    got = described(out)
    assert consecutive([s for s, *_ in got], 0xFFFF) and consecutive([p for _, p, *_ in got[::2]], 0x7FFF)


def test_resends_and_late_packets_keep_their_numbers(clock):
    """A NACK of a thinned stream is answered with the publisher packet it numbered, renumbered as first sent; a
    late packet of a kept picture fills its kept place; one of a left-out picture is not sent."""
    stream, down, out = thinned(clock, 15, 47)  # rates known; ends before a TL0 picture (index 48 % 4 == 0)
    kept = stream.picture(hold=True)  # TL0, delayed
    dropped = stream.picture(hold=True)  # TL2: to be left out
    after = stream.picture()  # TL1: arrives first
    assert rtp.vp8_ids(after[0][12:]).temporal == 1
    for packet in dropped + kept:
        stream.feed(packet)
    got = described(out[-4:])
    assert [tid for *_, tid in got] == [1, 1, 0, 0]
    (s1, p1, _, _), (s0, p0, _, _) = got[0], got[2]
    # the late TL0 picture took its kept place; the left-out one, late too, leaves its places empty
    assert (s1 - s0) & 0xFFFF == 4 and (p1 - p0) & 0x7FFF == 2
    assert down.original_seq((s0 + 2) & 0xFFFF) is None
    out.clear()
    down.on_nack([s0, s1])
    resent = described(out)
    assert resent == [(s0, p0, got[2][2], 0), (s1, p1, got[0][2], 1)]
    assert out[0].endswith(kept[0][-2:]) and out[1].endswith(after[0][-2:])


def test_padding_probes_take_numbers_of_their_own_while_thinning(clock):
    stream, down, out = thinned(clock, 15, 3)
    before = rtp.parse(out[-1])[2]
    down.send_padding(3, 200)
    stream.picture()
    seqs = [rtp.parse(p)[2] for p in out]
    assert seqs[-5:-2] == [(before + i) & 0xFFFF for i in (1, 2, 3)] and consecutive(seqs, 0xFFFF)
    assert down.original_seq(seqs[-3]) is None  # padding: nothing to resend


@pytest.mark.parametrize("codec, kept", [("VP8", False), ("VP9", True), ("AV1", True)])
def test_a_vp8_publisher_is_answered_without_the_dependency_descriptor(codec, kept):
    """With the descriptor negotiated, libwebrtc leaves the picture id, TL0PICIDX and temporal layer out of VP8's
    payload descriptor (Chrome then sent bare 0x10/0x30 headers, so nothing could be thinned); SVC codecs keep it."""
    from braid.services.media import negotiation, sdp

    offered = sdp.parse("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
                        "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=ice-ufrag:u\r\n"
                        "a=ice-pwd:pppppppppppppppppppppp\r\na=fingerprint:sha-256 AA:BB\r\na=setup:actpass\r\n"
                        f"a=sendonly\r\na=rtpmap:96 {codec}/90000\r\n"
                        f"a=extmap:4 {rtp.EXT_DEPENDENCY_DESCRIPTOR}\r\na=extmap:1 {rtp.EXT_MID}\r\n")
    media = offered.media[0]
    section = negotiation.publish_section(media, negotiation.choose_publish_codec(media))
    assert (rtp.EXT_DEPENDENCY_DESCRIPTOR in section.extmaps.values()) is kept
    assert section.extmaps[1] == rtp.EXT_MID
