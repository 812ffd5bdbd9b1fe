"""SVC layer selection without a server: the VP9 and AV1 layer readers, the sequence numbering that hides dropped
packets, and a subscriber's down-track on a synthetic three-layer VP9 stream (the SDK end-to-end tests are in
tests/test_cluster_simulcast.py)."""

from __future__ import annotations

from braid.services.media import rtp, svc, temporal
from braid.services.media.forward import UpTrack
from braid.services.media.svc import SvcDownTrack, av1_layer, vp9_layer
from braid.services.media.temporal import SeqMap

SSRC = 0x1234
PT = 98


def vp9_payload(spatial: int, temporal: int, begins: bool, ends: bool, inter: bool, body: bytes = b"x") -> bytes:
    """A flexible-mode descriptor with a 15-bit picture id and layer indices (and one P_DIFF when inter)."""
    b0 = 0x80 | 0x20 | 0x10 | (0x40 if inter else 0) | (0x08 if begins else 0) | (0x04 if ends else 0)
    return bytes([b0, 0x80, 0x01, (temporal << 5) | (spatial << 1)]) + (b"\x02" if inter else b"") + body


def test_vp9_layer_reads_the_descriptor():
    ids = vp9_layer(vp9_payload(2, 1, True, False, True))
    assert (ids.spatial, ids.temporal, ids.begins, ids.ends, ids.keyframe) == (2, 1, True, False, False)
    assert vp9_layer(vp9_payload(0, 0, True, True, False)).keyframe
    assert not vp9_layer(vp9_payload(1, 0, True, True, False)).keyframe  # an upper layer of the key picture
    assert vp9_layer(bytes([0x0C])) == (0, 0, True, True, True)  # no layer indices: a stream without layers
    assert vp9_layer(b"") is None and vp9_layer(bytes([0xA8])) is None  # truncated


def test_av1_layer_reads_obu_extension_headers_and_follows_fragments():
    seq_header = bytes([0x0A, 0x00])  # OBU_SEQUENCE_HEADER, has_size, no extension
    frame = bytes([(6 << 3) | 0x04, (1 << 5) | (2 << 3)]) + b"frame-data"  # OBU_FRAME, temporal 1, spatial 2
    first = bytes([0x08 | 0x20 | 0x40, len(seq_header)]) + seq_header + frame  # N, W=2, Y: continues
    ids = av1_layer(first, 10, lambda s: None)
    assert (ids.spatial, ids.temporal, ids.begins, ids.ends, ids.keyframe) == (2, 1, True, False, True)
    middle, last = bytes([0x80 | 0x40 | 0x10]) + b"more", bytes([0x80 | 0x10]) + b"end"
    earlier = {10: first, 11: middle}
    ids = av1_layer(last, 12, earlier.get)
    assert (ids.spatial, ids.temporal, ids.begins, ids.ends, ids.keyframe) == (2, 1, False, True, False)
    assert av1_layer(last, 12, {11: middle}.get) is None  # the OBU's start is gone: unknown
    assert av1_layer(bytes([0x10]) + seq_header, 1, lambda s: None) == (0, 0, True, True, False)  # no layers
    assert av1_layer(bytes([0x00, 0xFF]), 1, lambda s: None) is None  # a length running off the end


def test_seq_map_numbers_what_is_sent_and_keeps_late_packets_places():
    seqs = SeqMap()
    seqs.restart(100, 5000)
    assert seqs.send(100) == 5000
    seqs.drop(101)
    assert seqs.send(102) == 5001
    assert seqs.send(105) == 5004  # 103 and 104 are late: their numbers are kept
    assert seqs.send(103) == 5002
    seqs.drop(104)  # late, and not to be sent: its number stays a hole
    assert seqs.send(104) is None and seqs.original(5003) is None
    assert [seqs.original(o) for o in (5000, 5001, 5002, 5004)] == [100, 102, 103, 105]
    assert seqs.send(99) is None  # before the start
    seqs.restart(0xFFFE, 0xFFFF)
    assert [seqs.send(s) for s in (0xFFFE, 0xFFFF, 0)] == [0xFFFF, 0, 1]  # both wrap


class Stream:
    """An up-track fed with synthetic VP9 pictures of three spatial layers (two packets each)."""

    def __init__(self):
        self.keyframe_requests = 0
        self.up = UpTrack("TR_svc", "video", "video/VP9", 90000, PT, None, self._pli, lambda ssrc, seqs: None)
        self.layer = self.up.add_layer(SSRC)
        self.seq, self.ts = 1000, 0

    def _pli(self, ssrc: int) -> None:
        self.keyframe_requests += 1

    def viewer(self, quality: int) -> tuple[SvcDownTrack, list[bytes]]:
        sent: list[bytes] = []
        down = SvcDownTrack(self.up, sent.append, PT)
        down.requested_quality = quality
        self.up.add_down(down)
        return down, sent

    def picture(self, key: bool = False, skip: set[int] = frozenset(), temporal: int = 0) -> list[bytes]:
        """Sends one picture (except the packets whose index is in `skip`); returns all its packets."""
        packets = []
        for spatial in range(3):
            for part in range(2):
                payload = vp9_payload(spatial, temporal, part == 0, part == 1, not key,
                                      b"s%d-%d-%d" % (spatial, part, self.ts))
                marker = int(spatial == 2 and part == 1)
                packets.append(rtp.HEADER.pack(0x80, (marker << 7) | PT, self.seq & 0xFFFF, self.ts, SSRC) + payload)
                self.seq += 1
        self.ts += 3000
        for i, packet in enumerate(packets):
            if i not in skip:
                self.feed(packet)
        return packets

    def feed(self, packet: bytes) -> None:
        self.up.on_packet(self.layer, packet, rtp.parse(packet))


def summary(sent: list[bytes]) -> list[tuple[int, int, int]]:
    """(sequence number, marker, spatial layer) of each packet sent."""
    out = []
    for packet in sent:
        header = rtp.parse(packet)
        out.append((header[2], header[4], vp9_layer(packet[header[5]:]).spatial))
    return out


def test_each_viewer_gets_its_spatial_layers_numbered_without_gaps():
    stream = Stream()
    low, to_low = stream.viewer(0)
    high, to_high = stream.viewer(2)
    for i in range(4):
        stream.picture(key=i == 0)
    got = summary(to_low)
    assert [s for _, _, s in got] == [0, 0] * 4
    assert [(q - got[0][0]) & 0xFFFF for q, _, _ in got] == list(range(8))
    assert [m for _, m, _ in got] == [0, 1] * 4  # each picture ends at its last spatial-0 packet
    got = summary(to_high)
    assert [s for _, _, s in got] == [0, 0, 1, 1, 2, 2] * 4 and [m for _, m, _ in got] == [0, 0, 0, 0, 0, 1] * 4
    assert [(q - got[0][0]) & 0xFFFF for q, _, _ in got] == list(range(24))


def test_a_viewer_asking_for_fewer_frames_gets_fewer_temporal_layers(monkeypatch):
    """track_setting fps: once the stream's rate per temporal layer is known (L1T3's 0, 2, 1, 2 pattern at 30 fps:
    7.5, 15 and 30 pictures a second), a viewer asking for 15 gets layers 0 and 1 from the next base-layer
    picture on, numbered without gaps; one asking for nothing gets them all."""
    clock = [100.0]
    monkeypatch.setattr(temporal.time, "monotonic", lambda: clock[0])
    stream = Stream()
    half, to_half = stream.viewer(2)
    full, to_full = stream.viewer(2)
    half.set_max_fps(15)
    pattern = [0, 2, 1, 2]
    mark = 0
    for i in range(80):
        if i == 40:
            mark = len(to_half)
        stream.picture(key=i == 0, temporal=pattern[i % 4])
        clock[0] += 1 / 30
    assert [round(f) for f in svc.reader_for(stream.up).rates.fps] == [8, 15, 30]
    assert len(to_full) == 80 * 6
    recent = [vp9_layer(p[12:]).temporal for p in to_half[mark:]]
    assert set(recent) == {0, 1} and len(recent) == 20 * 6  # half of the 40 pictures
    got = summary(to_half)
    assert [(q - got[0][0]) & 0xFFFF for q, _, _ in got] == list(range(len(got)))


def test_publisher_padding_leaves_no_gap():
    """A publisher probing its uplink (send-side estimation once transport-wide feedback is on) sends padding-only
    packets on the video stream: they are not forwarded, and the numbering goes on without a gap the viewer
    would count as lost."""
    stream = Stream()
    viewer, sent = stream.viewer(0)
    stream.picture(key=True)
    for _ in range(5):
        padding = rtp.HEADER.pack(0xA0, PT, stream.seq & 0xFFFF, stream.ts, SSRC) + bytes(199) + bytes([200])
        stream.seq += 1
        stream.feed(padding)
    stream.picture()
    got = summary(sent)
    assert len(got) == 4 and [(q - got[0][0]) & 0xFFFF for q, _, _ in got] == [0, 1, 2, 3]


def test_going_up_waits_for_a_keyframe_and_going_down_does_not():
    stream = Stream()
    viewer, sent = stream.viewer(0)
    stream.picture(key=True)
    requests = stream.keyframe_requests
    viewer.set_max_quality(2)
    sent.clear()
    stream.picture()
    assert {s for _, _, s in summary(sent)} == {0}  # the upper layers need the key picture they start from
    assert stream.keyframe_requests > requests
    sent.clear()
    stream.picture(key=True)
    assert [s for _, _, s in summary(sent)] == [0, 0, 1, 1, 2, 2]
    viewer.set_max_quality(1)
    sent.clear()
    stream.picture()
    assert [(s, m) for _, m, s in summary(sent)] == [(0, 0), (0, 0), (1, 0), (1, 1)]


def test_late_packets_keep_their_place_and_nacks_resend_the_right_packet():
    stream = Stream()
    viewer, sent = stream.viewer(0)
    stream.picture(key=True)
    packets = stream.picture(skip={1, 2})  # its S0 end and S1 start come late
    assert len(sent) == 3
    stream.feed(packets[2])  # S1: not for this viewer
    stream.feed(packets[1])  # S0: sent now, with the number kept for it
    got = summary(sent)
    assert [(q - got[0][0]) & 0xFFFF for q, _, _ in got] == [0, 1, 2, 3] and got[3][1] == 1
    sent.clear()
    viewer.on_nack([got[3][0], got[3][0] + 1])  # the late one again, and one never sent
    assert len(sent) == 1
    header = rtp.parse(sent[0])
    assert header[2] == got[3][0] and header[4] == 1 and sent[0][header[5]:] == packets[1][12:]


def test_one_header_extension_in_either_form():
    short = rtp.with_extension(0x80, 1, PT, 7, 9, SSRC, 5, b"abc") + b"payload"
    long = rtp.with_extension(0x80, 0, PT, 7, 9, SSRC, 5, bytes(range(30))) + b"payload"
    assert short[12:14] == b"\xbe\xde" and long[12:14] == b"\x10\x00"
    for packet, value in ((short, b"abc"), (long, bytes(range(30)))):
        assert rtp.extensions(packet) == {5: value}
        header = rtp.parse(packet)
        assert header[2:5] == (7, 9, packet[1] >> 7) and packet[header[5]:] == b"payload"
    assert rtp.with_extension(0xA0, 0, PT, 7, 9, SSRC, 5, b"x")[0] == 0xB0  # padding flag kept, X set


def test_the_dependency_descriptor_goes_to_subscribers_that_negotiated_it():
    stream = Stream()
    stream.up.dd_id = 3
    viewer, sent = stream.viewer(0)
    viewer.dd_id = 9
    _, to_plain = stream.viewer(0)
    descriptor = bytes([0x80, 0x01, 0x02]) + bytes(20)  # start of frame, template 1, frame 2, a structure
    for packet in stream.picture(key=True, skip=set(range(6))):
        header = rtp.parse(packet)
        stream.feed(rtp.with_extension(packet[0], header[4], PT, header[2], header[3], SSRC, 3, descriptor)
                    + packet[12:])
    assert len(sent) == len(to_plain) == 2
    assert all(rtp.extensions(p) == {9: descriptor} for p in sent)
    assert all(not p[0] & 0x10 for p in to_plain)
    first = rtp.parse(sent[0])[2]
    sent.clear()
    viewer.on_nack([first])
    assert len(sent) == 1 and rtp.extensions(sent[0]) == {9: descriptor}


def test_the_dependency_descriptor_is_negotiated_with_two_byte_extensions():
    from braid.services.media import negotiation, sdp
    from braid.services.media.subscriber import dependency_descriptor_id

    offered = sdp.parse("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=extmap-allow-mixed\r\n"
                        "m=video 9 UDP/TLS/RTP/SAVPF 98\r\na=mid:0\r\na=ice-ufrag:u\r\na=ice-pwd:pppppppppppppppppppppp\r\n"
                        "a=fingerprint:sha-256 AA:BB\r\na=setup:actpass\r\n"
                        "a=recvonly\r\na=rtpmap:98 VP9/90000\r\n"
                        f"a=extmap:4 {rtp.EXT_DEPENDENCY_DESCRIPTOR}\r\n")
    assert offered.allow_mixed
    media = offered.media[0]
    assert dependency_descriptor_id(media, offered.allow_mixed) == 4
    assert dependency_descriptor_id(media, allow_mixed=False) == 0  # a keyframe's descriptor needs two bytes
    section = negotiation.send_section(media, media.codecs[0], sdp.Outgoing(1, "cn", "s", "t"))
    assert section.extmaps == {4: rtp.EXT_DEPENDENCY_DESCRIPTOR}
    ours = negotiation.offer_track_section("1", "video", media.codecs[0], None)
    assert rtp.EXT_DEPENDENCY_DESCRIPTOR in ours.extmaps.values()
    transport = sdp.Transport("u", "p" * 22, [("sha-256", "AA:BB")], "actpass", [])
    text = sdp.write([ours], transport, 1, 1, allow_mixed=True)
    assert "a=extmap-allow-mixed" in text and sdp.parse(text).allow_mixed


def test_layer_readers_take_any_bytes():
    """A publisher controls these payloads: whatever they hold, reading their layer never raises."""
    import random

    rng = random.Random(7)
    earlier: dict[int, bytes] = {}
    for seq in range(3000):
        payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 12)))
        earlier[seq] = payload
        for ids in (vp9_layer(payload), av1_layer(payload, seq, earlier.get)):
            assert ids is None or (0 <= ids.spatial < 8 and 0 <= ids.temporal < 8)
    for mime in ("video/VP9", "video/AV1"):
        up = UpTrack("TR_fuzz", "video", mime, 90000, PT, None, lambda ssrc: None, lambda ssrc, seqs: None)
        layer = up.add_layer(SSRC)
        down = SvcDownTrack(up, lambda packet: None, PT)
        up.add_down(down)
        for i in range(2000):
            payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 12)))
            packet = rtp.HEADER.pack(0x80, PT | (rng.getrandbits(1) << 7), rng.choice([i, rng.getrandbits(16)]),
                                     i * 3000, SSRC) + payload
            up.on_packet(layer, packet, rtp.parse(packet))
            if i % 50 == 0:
                down.on_nack([rng.getrandbits(16) for _ in range(8)])
                down.set_max_quality(rng.randint(0, 2))
