"""Unit tests of the media node's pure parts: SDP, negotiation policy, RTP/RTCP, the forwarding core."""

from __future__ import annotations

import time

import pytest

from braid.services.media import negotiation, rtcp, rtp, sdp
from braid.services.media.downtrack import DownTrack
from braid.services.media.forward import PacketBuffer, UpTrack

OFFER = "\r\n".join([
    "v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1 2", "a=extmap-allow-mixed",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63", "c=IN IP4 0.0.0.0", "a=ice-ufrag:abcd", "a=ice-pwd:0123456789012345678901",
    "a=fingerprint:sha-256 AA:BB", "a=setup:actpass", "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level", "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=sendonly", "a=msid:stream track-a", "a=rtcp-mux", "a=rtcp-rsize",
    "a=rtpmap:111 opus/48000/2", "a=fmtp:111 minptime=10;useinbandfec=1", "a=rtpmap:63 red/48000/2",
    "a=ssrc:1111 cname:x",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 103", "c=IN IP4 0.0.0.0", "a=mid:1", "a=sendonly", "a=msid:stream track-v",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid", "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
    "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id", "a=extmap:3 http://x/transport-cc",
    "a=rtpmap:96 VP8/90000", "a=rtcp-fb:96 nack", "a=rtcp-fb:96 nack pli", "a=rtcp-fb:96 transport-cc",
    "a=rtpmap:97 rtx/90000", "a=fmtp:97 apt=96",
    "a=rtpmap:103 H264/90000", "a=fmtp:103 packetization-mode=1;profile-level-id=42e01f",
    "a=rid:q send", "a=rid:h send", "a=rid:f send", "a=simulcast:send q;h;f",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "a=mid:2", "a=sctp-port:5000", "a=max-message-size:262144",
    "",
])


def test_parse_offer():
    session = sdp.parse(OFFER)
    assert session.bundle == ["0", "1", "2"]
    audio, video, app = session.media
    assert audio.ice_ufrag == "abcd" and audio.fingerprints == [("sha-256", "AA:BB")]
    assert video.ice_ufrag == "abcd"  # bundled m-lines inherit the first one's transport
    assert audio.sends and audio.msid_track_id() == "track-a"
    assert [c.name for c in video.codecs] == ["VP8", "rtx", "H264"]
    assert video.codec(97).apt == 96
    assert [r.rid for r in video.rids] == ["q", "h", "f"] and video.simulcast == "send q;h;f"
    assert app.sctp_port == 5000 and app.max_message_size == 262144


@pytest.mark.parametrize("bad", ["", "hello", "v=0\r\nm=audio\r\n", "v=0\r\nm=audio 9 RTP/AVP 0\r\n",
                                 "v=0\r\nm=audio x RTP/AVP 0\r\na=ice-ufrag:a\r\na=ice-pwd:b\r\n"])
def test_parse_rejects_garbage(bad):
    with pytest.raises(sdp.SdpError):
        sdp.parse(bad)


def _offer() -> sdp.Session:
    text = OFFER.replace("a=mid:1", "a=mid:1\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789012345678901\r\n"
                         "a=fingerprint:sha-256 AA:BB").replace(
        "a=mid:2", "a=mid:2\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789012345678901\r\na=fingerprint:sha-256 AA:BB")
    return sdp.parse(text)


def test_publish_answer_keeps_rids_and_needed_extensions():
    video = _offer().media[1]
    chosen = negotiation.choose_publish_codec(video)
    assert chosen.codec.name == "VP8" and chosen.rtx.pt == 97
    section = negotiation.publish_section(video, chosen)
    assert section.direction == "recvonly"
    assert [r.direction for r in section.rids] == ["recv"] * 3 and section.simulcast == "recv q;h;f"
    assert set(section.extmaps.values()) == {rtp.EXT_MID, rtp.EXT_RID, rtp.EXT_RRID}
    assert section.codecs[0].feedback == ["nack", "nack pli"]
    transport = sdp.Transport("u", "p" * 22, [("sha-256", "CC:DD")], "active", ["1 1 udp 2130706431 127.0.0.1 5000 typ host"])
    text = sdp.write([section], transport, 1, 1)
    assert "a=rid:q recv" in text and "a=simulcast:recv q;h;f" in text and "a=setup:active" in text
    assert "a=candidate:1 1 udp" in text and "a=end-of-candidates" in text
    reparsed = sdp.parse(text)
    assert reparsed.media[0].direction == "recvonly"


def test_publisher_gets_the_codec_its_add_track_request_names():
    """livekit-client offers VP8 first whatever the camera is to publish; its AddTrackRequest names the codec."""
    video = _offer().media[1]
    video.codecs.append(sdp.Codec(98, "VP9", 90000, fmtp="profile-id=0"))
    assert negotiation.choose_publish_codec(video, preferred="vp9").codec.name == "VP9"
    assert negotiation.choose_publish_codec(video, preferred="av1").codec.name == "VP8"  # not offered
    assert negotiation.choose_publish_codec(video, preferred="").codec.name == "VP8"


def test_subscribe_codec_matching():
    video = _offer().media[1]
    assert negotiation.match_subscribe_codec(video, sdp.Codec(100, "VP8", 90000)).pt == 96
    h264 = sdp.Codec(102, "H264", 90000, fmtp="packetization-mode=1;profile-level-id=42e01f")
    assert negotiation.match_subscribe_codec(video, h264).pt == 103
    assert negotiation.match_subscribe_codec(video, sdp.Codec(98, "VP9", 90000)) is None
    out = negotiation.send_section(video, video.codec(96), sdp.Outgoing(42, "cn", "PA_x|TR_y", "TR_y"))
    text = sdp.write([out], sdp.Transport("u", "p" * 22, [], "active", []), 1, 1)
    assert "a=msid:PA_x|TR_y TR_y" in text and "a=ssrc:42 msid:PA_x|TR_y TR_y" in text and "a=sendonly" in text


def test_rtp_parse_and_rewrite():
    ext = bytes([0xBE, 0xDE, 0x00, 0x01, 0x40, ord("1"), 0, 0])
    packet = bytes([0x90, 0x80 | 96]) + (513).to_bytes(2, "big") + (90000).to_bytes(4, "big") + \
        (77).to_bytes(4, "big") + ext + b"\x10\x00\x00payload"
    ssrc, pt, seq, ts, marker, off, end = rtp.parse(packet)
    assert (ssrc, pt, seq, ts, marker) == (77, 96, 513, 90000, 1)
    assert packet[off:end] == b"\x10\x00\x00payload"
    assert rtp.extensions(packet) == {4: b"1"}
    out = rtp.rewrite(packet[0], marker, 100, 7, 8, 9, packet[off:])
    assert rtp.parse(out)[:5] == (9, 100, 7, 8, 1) and rtp.extensions(out) == {}
    assert rtp.parse(b"\x00" * 5) is None and rtp.parse(b"\x40" + b"\x00" * 11) is None


def test_keyframe_detection():
    # VP8: S=1, PID=0, no extension; frame tag P bit 0 → key frame
    assert rtp.is_keyframe("video/VP8", bytes([0x10, 0x00]))
    assert not rtp.is_keyframe("video/VP8", bytes([0x10, 0x01]))
    assert not rtp.is_keyframe("video/VP8", bytes([0x00, 0x00]))  # not the start of a partition
    # VP8 with X, I (15-bit picture id), L, T bytes before the frame tag
    assert rtp.is_keyframe("video/VP8", bytes([0x90, 0xE0, 0x80, 0x01, 0x05, 0x20, 0x00]))
    assert rtp.is_keyframe("video/H264", bytes([0x65]))  # IDR
    assert rtp.is_keyframe("video/H264", bytes([0x78, 0x00, 0x02, 0x67, 0x42]))  # STAP-A with SPS
    assert rtp.is_keyframe("video/H264", bytes([0x7C, 0x85]))  # FU-A start of IDR
    assert not rtp.is_keyframe("video/H264", bytes([0x7C, 0x05]))  # FU-A continuation
    assert not rtp.is_keyframe("video/H264", bytes([0x41]))


def test_rtcp_roundtrip():
    nack = rtcp.nack(1, 2, [10, 11, 26, 27, 100])
    (parsed,) = rtcp.parse(nack)
    assert parsed.type == rtcp.RTPFB and parsed.media_ssrc == 2 and sorted(parsed.lost) == [10, 11, 26, 27, 100]
    compound = rtcp.sender_report(5, rtcp.ntp_now(), 1234, 10, 1000) + rtcp.pli(1, 5) + rtcp.fir(1, 5, 3) + \
        rtcp.remb(1, 1_500_000, [5, 6]) + rtcp.receiver_report(1, [rtcp.ReportBlock(5, 12, 3, 70000, 9, 1, 2)])
    sr, pli, fir, remb, rr = rtcp.parse(compound)
    assert sr.type == rtcp.SR and sr.rtp_ts == 1234
    assert pli.fmt == rtcp.FMT_PLI and pli.media_ssrc == 5
    assert fir.fir == [(5, 3)]
    assert abs(remb.bitrate - 1_500_000) < 1_500_000 * 0.01 and remb.ssrcs == [5, 6]
    assert rr.reports[0].ssrc == 5 and rr.reports[0].highest_seq == 70000 and rr.reports[0].packets_lost == 3
    assert rtcp.parse(b"\x80\xc8\xff\xff") == []  # length beyond the datagram


def test_packet_buffer():
    buf = PacketBuffer(8)
    for seq in range(20):
        buf.put(seq, bytes([seq]))
    assert buf.get(19) == bytes([19]) and buf.get(11) is None and buf.get(12) == bytes([12])


def _packet(seq: int, ts: int, ssrc: int, payload: bytes, pt: int = 96, marker: int = 0) -> bytes:
    return rtp.HEADER.pack(0x80, (marker << 7) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


KEY = bytes([0x10, 0x00, 0x9D])  # VP8 key frame start
DELTA = bytes([0x10, 0x01, 0x9D])


class _Track:
    def __init__(self, kind="video"):
        self.plis: list[int] = []
        self.nacks: list[tuple[int, list[int]]] = []
        mime = "video/VP8" if kind == "video" else "audio/opus"
        self.up = UpTrack("TR_x", kind, mime, 90000 if kind == "video" else 48000, 96, 97,
                          request_keyframe=self.plis.append, request_nack=lambda s, q: self.nacks.append((s, q)))
        self.sent: list[bytes] = []
        self.down = DownTrack(self.up, self.sent.append, pt=100, ssrc=555)
        self.up.add_down(self.down)

    def feed(self, layer, data):
        self.up.on_packet(layer, data, rtp.parse(data))


def test_video_waits_for_keyframe_then_rewrites_continuously():
    t = _Track()
    layer = t.up.add_layer(1000)
    assert t.plis  # subscribing asks for a keyframe
    t.feed(layer, _packet(10, 3000, 1000, DELTA))
    assert t.sent == []
    t.feed(layer, _packet(11, 6000, 1000, KEY))
    t.feed(layer, _packet(12, 6000, 1000, DELTA, marker=1))
    t.feed(layer, _packet(13, 9000, 1000, DELTA))
    out = [rtp.parse(p) for p in t.sent]
    assert [o[0] for o in out] == [555] * 3 and [o[1] for o in out] == [100] * 3
    assert [(o[2] - out[0][2]) & 0xFFFF for o in out] == [0, 1, 2]
    assert [(o[3] - out[0][3]) & 0xFFFFFFFF for o in out] == [0, 0, 3000]
    assert out[1][4] == 1


def test_nack_is_answered_from_the_buffer_and_forwarded_upstream():
    t = _Track()
    layer = t.up.add_layer(1000)
    for seq in range(100, 110):
        t.feed(layer, _packet(seq, seq * 10, 1000, KEY if seq == 100 else DELTA))
    first_out = rtp.parse(t.sent[0])[2]
    t.sent.clear()
    t.down.on_nack([(first_out + 3) & 0xFFFF])
    assert len(t.sent) == 1 and rtp.parse(t.sent[0])[2] == (first_out + 3) & 0xFFFF
    assert t.sent[0].endswith(DELTA)
    t.feed(layer, _packet(115, 1150, 1000, DELTA))  # 110-114 lost upstream: NACKed towards the publisher
    assert t.nacks and t.nacks[-1][0] == 1000 and t.nacks[-1][1] == [110, 111, 112, 113, 114]


def test_keyframe_requests_are_throttled():
    t = _Track()
    layer = t.up.add_layer(1000)
    assert t.plis == [1000]  # the new subscriber's own request
    t.plis.clear()
    layer.keyframe_requested_at = 0.0
    for _ in range(5):
        t.down.on_keyframe_request()
    assert t.plis == [1000]
    assert t.down.plis == 5


def test_layer_switch_happens_on_a_keyframe_and_keeps_sequence_continuity():
    t = _Track()
    low = t.up.add_layer(2000, "q")
    t.down.set_max_quality(0)
    t.feed(low, _packet(50, 1000, 2000, KEY))
    t.feed(low, _packet(51, 4000, 2000, DELTA))
    high = t.up.add_layer(3000, "f")
    t.down.set_max_quality(2)
    high.last_at = low.last_at  # both active
    high.packets = 1
    t.up.reassign()
    t.feed(high, _packet(900, 777000, 3000, DELTA))  # not a keyframe: still on the low layer
    t.feed(low, _packet(52, 7000, 2000, DELTA))
    t.feed(high, _packet(901, 780000, 3000, KEY))  # switch
    t.feed(low, _packet(53, 10000, 2000, DELTA))  # ignored now
    t.feed(high, _packet(902, 783000, 3000, DELTA))
    seqs = [rtp.parse(p)[2] for p in t.sent]
    assert len(seqs) == 5
    assert [(s - seqs[0]) & 0xFFFF for s in seqs] == [0, 1, 2, 3, 4]
    assert t.down.current is high


def _vp8(pid: int, tl0: int, key: bool) -> bytes:
    """A VP8 packet starting a frame, with a 15-bit picture id and TL0PICIDX, as Chrome sends."""
    return bytes([0x90, 0xC0, 0x80 | (pid >> 8), pid & 0xFF, tl0, 0x00 if key else 0x01, 0x9D])


def test_layer_switch_continues_the_subscribers_vp8_picture_ids():
    """Each simulcast layer numbers its pictures from its own random start; a subscriber whose picture ids jumped
    back on a switch would drop every frame as already decoded, so they continue across it (and in resends)."""
    t = _Track()
    low, high = t.up.add_layer(2000, "q"), t.up.add_layer(3000, "f")
    t.down.set_max_quality(0)
    t.feed(low, _packet(50, 1000, 2000, _vp8(20000, 7, True)))
    t.feed(low, _packet(51, 4000, 2000, _vp8(20001, 8, False)))
    t.down.set_max_quality(2)
    high.last_at, high.packets = low.last_at, 1
    t.up.reassign()
    t.feed(high, _packet(901, 780000, 3000, _vp8(32767, 250, True)))  # switch: picture ids from 20002, 9
    t.feed(high, _packet(902, 783000, 3000, _vp8(0, 251, False)))  # the high layer's ids wrap
    seen = [rtp.vp8_ids(p[12:]) for p in t.sent]
    assert [(i.picture_id, i.tl0) for i in seen] == [(20000, 7), (20001, 8), (20002, 9), (20003, 10)]
    assert all(p.endswith(b"\x9d") and len(p) == 12 + 7 for p in t.sent)
    t.sent.clear()
    t.down.on_nack([t.down.last_seq])
    assert [(rtp.vp8_ids(p[12:]).picture_id, rtp.vp8_ids(p[12:]).tl0) for p in t.sent] == [(20003, 10)]
    assert rtp.vp8_ids(bytes([0x90, 0x80])) is None and rtp.vp8_ids(bytes([0x10, 0x00])) is None  # truncated; none


def test_mute_stops_forwarding_and_rtx_is_restored():
    t = _Track()
    layer = t.up.add_layer(1000)
    t.up.add_rtx(1001, layer)
    t.feed(layer, _packet(1, 100, 1000, KEY))
    t.up.muted = True
    t.feed(layer, _packet(2, 200, 1000, DELTA))
    assert len(t.sent) == 1
    t.up.muted = False
    rtx = _packet(7, 300, 1001, (3).to_bytes(2, "big") + DELTA, pt=97)
    t.up.on_rtx(layer, rtx, rtp.parse(rtx))
    assert len(t.sent) == 2 and rtp.parse(t.sent[1])[1] == 100 and t.sent[1].endswith(DELTA)
    assert layer.buffer.get(3) is not None


def test_audio_starts_immediately_and_sender_report_uses_publisher_clock():
    t = _Track("audio")
    layer = t.up.add_layer(4000)
    t.feed(layer, _packet(1, 960, 4000, b"opus"))
    assert len(t.sent) == 1
    sr = rtcp.parse(t.down.sender_report(0.0) or b"")
    assert sr and sr[0].type == rtcp.SR and sr[0].sender_ssrc == 555


def _audio_packet(level: int, ext_id: int = 1) -> bytes:
    ext = bytes([0xBE, 0xDE, 0x00, 0x01, (ext_id << 4) | 0, 0x80 | level, 0, 0])
    return bytes([0x90, 111]) + (1).to_bytes(2, "big") + (0).to_bytes(4, "big") + (9).to_bytes(4, "big") + ext + b"op"


def test_audio_level_and_speaker_changes():
    from braid.services.media.speakers import AudioLevel, Speakers

    assert rtp.audio_level(_audio_packet(20), 1) == 20
    assert rtp.audio_level(_audio_packet(20), 2) is None
    loud, quiet = AudioLevel(1), AudioLevel(1)
    for i in range(10):
        loud.observe(_audio_packet(10 if i % 2 else 60))  # half the packets above -35 dBov
        quiet.observe(_audio_packet(90))
    level = loud.take()
    assert 0 < level <= 1 and quiet.take() == 0.0
    speakers = Speakers()
    changed = speakers.update({"PA_a": level, "PA_b": 0.0})
    assert [(s.sid, s.active) for s in changed] == [("PA_a", True)]
    assert speakers.update({"PA_a": level, "PA_b": 0.0}) == []
    assert [(s.sid, s.active) for s in speakers.update({"PA_b": 0.0})] == [("PA_a", False)]
    assert speakers.current() == []


def test_the_followup_keyframe_request_waits_out_the_throttle_instead_of_being_lost():
    """A new subscriber asks once more shortly after its first keyframe; a tick inside the request throttle must
    keep that follow-up for the next tick, not drop it (the subscriber would wait for its own PLI)."""
    from braid.services.media.forward import KEYFRAME_REQUEST_INTERVAL

    t = _Track()
    layer = t.up.add_layer(1000)
    t.feed(layer, _packet(11, 6000, 1000, KEY))
    assert t.down.followup_keyframe
    asked = len(t.plis)
    t.up.tick(layer.keyframe_requested_at + 0.05)
    assert len(t.plis) == asked and t.down.followup_keyframe, "throttled: kept for later"
    layer.keyframe_requested_at -= KEYFRAME_REQUEST_INTERVAL  # the throttle has passed
    t.up.tick(time.monotonic())
    assert len(t.plis) == asked + 1 and not t.down.followup_keyframe
