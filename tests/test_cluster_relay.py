"""The node-to-node relay's data plane in one process, over real UDP sockets on loopback: SRTP both ways,
sequence numbers kept end to end, NACKs answered from the origin's buffer, PLIs reaching the publisher side, and
packets under the wrong key refused."""

from __future__ import annotations

import asyncio

import pytest

from braid.services.media import rtp
from braid.services.media.cluster.relay import InboundLink, OutboundLink, RelayEndpoint, new_key
from braid.services.media.forward import UpTrack
from braid.services.media.ice import PortRange

VP8_KEYFRAME = bytes([0x10, 0x00, 0x9D, 0x01, 0x2A]) + b"\x00" * 100


class Feedback:
    def __init__(self):
        self.plis: list[int] = []
        self.nacks: list[tuple[int, list[int]]] = []


def _up(sid: str, feedback: Feedback) -> UpTrack:
    return UpTrack(sid, "video", "video/VP8", 90000, 96, None,
                   request_keyframe=feedback.plis.append,
                   request_nack=lambda ssrc, seqs: feedback.nacks.append((ssrc, seqs)))


def _packet(seq: int, ts: int, ssrc: int = 1234, payload: bytes = VP8_KEYFRAME) -> bytes:
    return rtp.HEADER.pack(0x80, 0x80 | 96, seq, ts, ssrc) + payload


class Received:
    def __init__(self):
        self.packets: list[bytes] = []

    def write(self, layer, b0, marker, seq, ts, payload, keyframe):  # a DownTrack's signature
        self.packets.append((seq, ts, bytes(payload)))


@pytest.fixture
async def relay():
    ports = PortRange(43100, 43199, host="127.0.0.1")
    origin_ep, sub_ep = RelayEndpoint(), RelayEndpoint()
    await origin_ep.open(ports, "127.0.0.1")
    await sub_ep.open(ports, "127.0.0.1")
    key_down, key_up = new_key(), new_key()
    announced = []
    out = OutboundLink(origin_ep, "sub", ("127.0.0.1", sub_ep.port), key_down, key_up, on_layers=announced.append)
    origin_ep.add_outbound(out)
    inbound = InboundLink(sub_ep, "origin", key_down, key_up)
    inbound.addr = ("127.0.0.1", origin_ep.port)
    sub_ep.add_inbound(inbound)
    yield origin_ep, sub_ep, out, inbound, announced
    out.close()
    inbound.close()
    origin_ep.close()
    sub_ep.close()


async def _settle(predicate, timeout=2.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_packets_cross_once_with_their_numbers_and_feedback_flows_back(relay):
    origin_ep, sub_ep, out, inbound, announced = relay
    publisher_side, relayed_side = Feedback(), Feedback()
    origin = _up("TR_v", publisher_side)
    layer = origin.add_layer(1234)
    sink = out.attach(origin, "TR_v")
    assert publisher_side.plis == [1234], "a new link starts with a keyframe request"

    relayed = _up("TR_v", relayed_side)
    got = Received()
    (rid, quality, relay_ssrc), = sink.layers()
    relayed_layer = relayed.add_layer(relay_ssrc, rid)
    relayed_layer.subs = [got]
    inbound.by_ssrc[relay_ssrc] = (relayed, relayed_layer)

    for seq in (100, 101, 103):
        data = _packet(seq, 9000 + seq)
        origin.on_packet(layer, data, rtp.parse(data))
    assert await _settle(lambda: len(got.packets) == 3)
    assert [(s, t) for s, t, _ in got.packets] == [(100, 9100), (101, 9101), (103, 9103)]
    assert got.packets[0][2] == VP8_KEYFRAME
    assert sub_ep.packets_in == 3 and origin_ep.packets_out == 3, "one crossing per packet"
    # A gap the origin saw itself is NACKed to the publisher there (102 never reached the origin).
    assert publisher_side.nacks == [(1234, [102])] and relayed_side.nacks == [(relay_ssrc, [102])]
    relayed_side.nacks.clear()
    # A packet lost on the relay: the subscribing node NACKs it across, the origin answers from its buffer.
    receive, inbound.on_rtp = inbound.on_rtp, lambda data: True  # the network drops the next datagram
    data = _packet(104, 9104, payload=b"\x00" * 50)
    origin.on_packet(layer, data, rtp.parse(data))
    assert await _settle(lambda: sub_ep.packets_in == 4)
    inbound.on_rtp = receive
    data = _packet(105, 9105, payload=b"\x00" * 50)
    origin.on_packet(layer, data, rtp.parse(data))
    assert await _settle(lambda: relayed_side.nacks)
    (ssrc, seqs), = relayed_side.nacks
    assert ssrc == relay_ssrc and 104 in seqs
    inbound.nack(relay_ssrc, [104])
    assert await _settle(lambda: [s for s, _, _ in got.packets] == [100, 101, 103, 105, 104])
    assert out.retransmits == 1
    publisher_side.plis.clear()
    layer.keyframe_requested_at = 0
    inbound.pli(relay_ssrc)
    assert await _settle(lambda: publisher_side.plis == [1234])


async def test_packets_under_another_key_are_refused(relay):
    origin_ep, sub_ep, out, inbound, _ = relay
    intruder = OutboundLink(origin_ep, "intruder", ("127.0.0.1", sub_ep.port), new_key(), new_key(),
                            on_layers=lambda sink: None)
    feedback = Feedback()
    origin = _up("TR_x", feedback)
    layer = origin.add_layer(77)
    sink = intruder.attach(origin, "TR_x")
    (_, _, ssrc), = sink.layers()
    relayed = _up("TR_x", Feedback())
    got = Received()
    relayed_layer = relayed.add_layer(ssrc)
    relayed_layer.subs = [got]
    inbound.by_ssrc[ssrc] = (relayed, relayed_layer)
    data = _packet(1, 1, ssrc=77)
    origin.on_packet(layer, data, rtp.parse(data))
    assert await _settle(lambda: sub_ep.errors >= 1)
    assert got.packets == [] and inbound.packets == 0
    intruder.detach("TR_x")


def test_relay_keys_are_sealed_for_the_cluster_and_bound_to_the_node():
    from braid.services.media.cluster.sealing import SealError, cluster_key, seal, unseal

    ours = cluster_key({"k1": "s1", "k2": "s2"})
    assert ours == cluster_key({"k2": "s2", "k1": "s1"}), "every node derives the same key"
    secret = new_key()
    sealed = seal(ours, secret, "ND_sub")
    assert secret not in sealed, "the keys never cross the wire in the clear"
    assert unseal(ours, sealed, "ND_sub") == secret
    with pytest.raises(SealError):
        unseal(ours, sealed, "ND_other")  # replayed under another node's name
    with pytest.raises(SealError):
        unseal(cluster_key({"k1": "another-secret"}), sealed, "ND_sub")  # a node of another cluster
    with pytest.raises(SealError):
        unseal(ours, b"short", "ND_sub")


VP8_DELTA = bytes([0x10, 0x01]) + b"\x00" * 100  # P bit set in the payload header: an inter frame


def _simulcast(feedback: Feedback) -> tuple[UpTrack, list]:
    up = _up("TR_s", feedback)
    up.expected_rids = ["q", "h", "f"]
    return up, [up.add_layer(ssrc, rid) for ssrc, rid in ((11, "q"), (12, "h"), (13, "f"))]


def _send_all(up: UpTrack, layers, seq: int, keyframe_on=()) -> None:
    for layer in layers:
        payload = VP8_KEYFRAME if layer.rid in keyframe_on else VP8_DELTA
        data = _packet(seq, seq * 3000, ssrc=layer.ssrc, payload=payload)
        up.on_packet(layer, data, rtp.parse(data))


async def test_only_the_layers_the_subscribing_node_wants_cross(relay):
    """The relay carries, per cap the subscribing node's subscribers want, the layer a local subscriber with that
    cap would get; a switch keeps the old layer until the new one passed a keyframe; no demand, nothing crosses."""
    origin_ep, sub_ep, out, inbound, _ = relay
    feedback = Feedback()
    up, (q, h, f) = _simulcast(feedback)
    sink = out.attach(up, "TR_s", wants=(0,))
    assert feedback.plis == [11], "only the layer that starts crossing is asked for a keyframe"
    relayed = _up("TR_s", Feedback())
    got: dict[str, Received] = {}
    for rid, quality, ssrc in sink.layers():
        inbound.by_ssrc[ssrc] = (relayed, relayed.add_layer(ssrc, rid))
    for layer in relayed.layers:
        got[layer.rid] = Received()
        layer.subs = [got[layer.rid]]

    async def crossing(seq: int, keyframe_on=()) -> set[str]:
        """The layers whose packet of `seq` reached the subscribing node."""
        for received in got.values():
            received.packets.clear()
        sent, arrived = origin_ep.packets_out, sub_ep.packets_in
        _send_all(up, (q, h, f), seq, keyframe_on)
        assert await _settle(lambda: sub_ep.packets_in - arrived == origin_ep.packets_out - sent)
        return {rid for rid, received in got.items() if received.packets}

    assert await crossing(1) == {"q"}
    sink.set_wants((2,))
    assert await crossing(2) == {"q", "f"}, "the low layer keeps flowing until the top one has a keyframe"
    assert await crossing(3, keyframe_on={"f"}) == {"q", "f"}, "(the low layer's packet went first)"
    assert await crossing(4) == {"f"}, "the top layer's keyframe passed: the low layer stops"
    sink.set_wants((0, 2))
    assert await crossing(5) == {"q", "f"}, "two subscribers there with different caps: both their layers"
    assert sorted(up.demand()) == [0, 2]
    sink.set_wants(())
    assert await crossing(6) == set(), "every subscriber there disabled the track"
    assert up.demand() == []
    sink.set_wants((1,))
    assert await crossing(7) == {"h"}
    out.detach("TR_s")
    assert await crossing(8) == set() and up.relays == [] and not any(layer.relays for layer in up.layers)


def test_the_subscribing_node_follows_the_layers_the_origin_relays_and_reports_its_demand():
    """A relayed up-track tells its origin each change of what its subscribers want; its subscribers switch to a
    layer whose packets arrive before the origin's word that it relays it, and leave at once a layer the origin
    stopped relaying although its last packets are still arriving."""
    import time

    from braid.services.media.cluster.relayed import RelayedUpTrack
    from braid.services.media.downtrack import DownTrack

    demands, sent = [], []
    up = RelayedUpTrack("TR_r", "video", "video/VP8", 90000, 96, None, request_keyframe=lambda ssrc: None,
                        request_nack=lambda ssrc, seqs: None, on_demand=lambda: None,
                        on_demand_change=lambda: demands.append(up.wanted))
    up.expected_rids = ["q", "h", "f"]
    q, h, f = (up.add_layer(ssrc, rid) for ssrc, rid in ((21, "q"), (22, "h"), (23, "f")))
    down = DownTrack(up, sent.append, 96)
    up.add_down(down)
    assert demands == [(2,)], "the first subscriber wants the top layer"
    up.forwarded, up.told_at = [f], time.monotonic()
    _send_all(up, (f,), 1, keyframe_on={"f"})
    assert down.current is f and len(sent) == 1

    down.set_max_quality(0)  # the viewer's tile shrank
    assert demands[-1] == (0,)
    assert down.target is f, "only the top layer arrives yet"
    _send_all(up, (q, f), 2)  # the low layer's first packets beat the origin's word
    assert down.target is q and down.current is f, "on the low layer's keyframe it switches; until then: top"
    _send_all(up, (q, f), 3, keyframe_on={"q"})
    assert down.current is q
    up.forwarded, up.told_at = [q], time.monotonic()
    up.reassign()

    down.set_max_quality(2)
    up.forwarded, up.told_at = [f], time.monotonic()  # the origin moved to the top layer again
    up.reassign()
    assert down.target is f and down.current is q, "the low layer is left at the top one's keyframe"
    down.pause()
    assert demands[-1] == (), "a disabled subscriber wants nothing"
    down.resume()
    assert demands[-1] == (2,)
