"""Audio RED handling without a server: the payload format (RFC 2198), the codec choice both ways, and the
down-tracks that forward RED as is, with the subscriber's inner payload type, or as plain Opus."""

from __future__ import annotations

from braid.services.media import negotiation, red, rtp, sdp
from braid.services.media.downtrack import RepayloadingDownTrack, UnwrappingDownTrack
from braid.services.media.forward import UpTrack
from braid.services.media.subscriber import down_track

OPUS = sdp.Codec(111, "opus", 48000, 2, "minptime=10;useinbandfec=1")
RED = sdp.Codec(63, "red", 48000, 2, "111/111")


def _red_payload(blocks: list[bytes], pt: int = 111) -> bytes:
    """Redundant blocks (oldest first) then the primary, each 20 ms apart."""
    header = b""
    for i, block in enumerate(blocks[:-1]):
        offset = 960 * (len(blocks) - 1 - i)
        header += bytes([0x80 | pt, (offset >> 6) & 0xFF, ((offset & 0x3F) << 2) | (len(block) >> 8), len(block) & 0xFF])
    return header + bytes([pt]) + b"".join(blocks)


def test_primary_block_and_inner_payload_type():
    payload = _red_payload([b"old-frame", b"prev-frame", b"PRIMARY"])
    assert red.primary(payload) == b"PRIMARY"
    assert red.primary(_red_payload([b"only"])) == b"only"
    assert red.primary(b"\x80\x00") == b""  # truncated header
    assert red.primary(_red_payload([b"x" * 40, b""])) == b""  # empty primary
    rewritten = red.with_block_pt(payload, 109)
    assert red.primary(rewritten) == b"PRIMARY"
    assert rewritten[0] & 0x7F == 109 and rewritten[4] & 0x7F == 109 and rewritten[8] == 109


def _media(codecs: list[sdp.Codec]) -> sdp.Media:
    return sdp.Media("audio", 9, "UDP/TLS/RTP/SAVPF", [str(c.pt) for c in codecs], mid="0", codecs=codecs)


def test_publisher_red_is_preferred_unless_disabled_and_answered_with_nack():
    offer = _media([OPUS, RED])
    chosen = negotiation.choose_publish_codec(offer)
    assert chosen is not None and chosen.codec.name == "red"
    section = negotiation.publish_section(offer, chosen)
    assert [c.name for c in section.codecs] == ["red", "opus"]
    assert "nack" in section.codecs[1].feedback
    plain = negotiation.choose_publish_codec(offer, allow_red=False)
    assert plain is not None and plain.codec.name == "opus"


def test_subscribers_get_red_when_they_offer_it_else_opus():
    assert negotiation.match_subscribe_codec(_media([OPUS, RED]), RED).name == "red"
    assert negotiation.match_subscribe_codec(_media([OPUS]), RED).name == "opus"
    up = UpTrack("TR_a", "audio", "audio/red", 48000, 63, None, lambda s: None, lambda s, q: None)
    other_pt = sdp.Codec(100, "red", 48000, 2, "109/109")
    assert type(down_track(up, lambda b: None, RED, RED)).__name__ == "DownTrack"
    assert isinstance(down_track(up, lambda b: None, RED, OPUS), UnwrappingDownTrack)
    assert isinstance(down_track(up, lambda b: None, RED, other_pt), RepayloadingDownTrack)


def test_plain_opus_subscriber_receives_the_primary_frames():
    up = UpTrack("TR_a", "audio", "audio/red", 48000, 63, None, lambda s: None, lambda s, q: None)
    sent: list[bytes] = []
    down = UnwrappingDownTrack(up, sent.append, pt=111)
    up.add_down(down)
    layer = up.add_layer(1234)
    for i in range(3):
        data = rtp.HEADER.pack(0x80, 63, 100 + i, 960 * i, 1234) + _red_payload([b"prev%d" % i, b"frame%d" % i])
        up.on_packet(layer, data, rtp.parse(data))
    assert [p[12:] for p in sent] == [b"frame0", b"frame1", b"frame2"]
    assert all(p[1] & 0x7F == 111 for p in sent)
    down.on_nack([(101 + down.seq_off) & 0xFFFF])  # audio retransmission, unwrapped too
    assert sent[-1][12:] == b"frame1" and down.retransmits == 1


def test_opus_stereo_and_dtx_parameters():
    codec = negotiation.opus_params(OPUS, stereo=True, dtx=True)
    assert codec.params() == {"minptime": "10", "useinbandfec": "1", "stereo": "1", "sprop-stereo": "1", "usedtx": "1"}
    assert "stereo" not in negotiation.opus_params(codec, stereo=False, dtx=False).params()
    assert negotiation.opus_params(RED, stereo=True) is RED
