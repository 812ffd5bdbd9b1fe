"""The compiled send path against its reference: the same bytes as pylibsrtp (aiortc's SRTP) and as the Python
header rewrite of forward.DownTrack, for the same keys and packets, rollover counter included."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import struct
import subprocess
import sys

import pylibsrtp
import pytest
from aiortc.rtcdtlstransport import RTCCertificate

from braid.services.media import fastpath, rtp, sdp, twcc
from braid.services.media.downtrack import DownTrack, Vp8DownTrack
from braid.services.media.forward import UpTrack
from braid.services.media.ice import IceHost, PortRange
from braid.services.media.icemux import node_ice_host
from braid.services.media.transport import PeerTransport

if fastpath.UNAVAILABLE and os.environ.get("CI"):  # CI installs a compiler and libssl-dev: it must be built there
    raise RuntimeError(f"the compiled forwarding path must be built in CI: {fastpath.UNAVAILABLE}")
_fast = pytest.importorskip("braid.services.media.fastpath._fastpath", reason="compiled path not built")

PROFILES = [  # (pylibsrtp profile, key + salt length)
    (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
]


def reference(key: bytes, profile: int, inbound: bool = False) -> pylibsrtp.Session:
    """An SRTP session configured the way aiortc configures its own (rtcdtlstransport._setup_srtp)."""
    ssrc_type = pylibsrtp.Policy.SSRC_ANY_INBOUND if inbound else pylibsrtp.Policy.SSRC_ANY_OUTBOUND
    policy = pylibsrtp.Policy(key=key, ssrc_type=ssrc_type, srtp_profile=profile)
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return pylibsrtp.Session(policy)


def packet(seq: int, ssrc: int, rng: random.Random, csrcs: int = 0, extension: bool = False) -> bytes:
    header = struct.pack("!BBHII", 0x80 | (0x10 if extension else 0) | csrcs, 96, seq & 0xFFFF, seq * 3000, ssrc)
    header += b"".join(struct.pack("!I", rng.getrandbits(32)) for _ in range(csrcs))
    if extension:
        header += struct.pack("!HH", 0xBEDE, 2) + bytes([0x10, 0x2A, 0x22, 1, 2, 3, 0, 0])
    return header + rng.randbytes(rng.randint(1, 1200))


@pytest.mark.parametrize("profile,key_len", PROFILES)
def test_protect_matches_pylibsrtp_across_rollover_repeats_and_replays(profile, key_len):
    rng = random.Random(profile)
    key = rng.randbytes(key_len)
    ref, fast = reference(key, profile), _fast.SrtpContext(key, profile)
    seqs = (
        list(range(65500, 65536)) + list(range(0, 40))  # a wrap: the rollover counter becomes 1
        + [65530, 10, 5]  # late packets from before and after the wrap, and a repeat (retransmission)
        + [20000, 30, 40000, 60000, 65535, 0, 100]  # jumps, one too old for the window, a second wrap
        + list(range(64000, 65536, 97)) + list(range(0, 3000, 89))  # a third wrap in big steps
    )
    outcomes = []
    for ssrc in (0x1234, 0xDEADBEEF):
        for i, seq in enumerate(seqs):
            pkt = packet(seq, ssrc, rng, csrcs=i % 3, extension=i % 4 == 1)
            try:
                expected = ref.protect(pkt)
            except pylibsrtp.Error:
                expected = None
            try:
                got = fast.protect(pkt)
            except _fast.Error:
                got = None
            assert got == expected, (ssrc, i, seq)
            outcomes.append(expected is not None)
    assert not all(outcomes) and sum(outcomes) > len(outcomes) * 0.9  # both outcomes were compared


@pytest.mark.parametrize("profile,key_len", PROFILES)
def test_unprotect_matches_pylibsrtp_across_rollover_replays_and_forgeries(profile, key_len):
    """The one decrypt per received packet: same plain bytes as aiortc's inbound session, same refusals (a
    repeat, a packet older than the window, a flipped bit anywhere), rollover counter followed across wraps."""
    rng = random.Random(profile + 100)
    key = rng.randbytes(key_len)
    sender, ref, fast = reference(key, profile), reference(key, profile, inbound=True), _fast.SrtpContext(key, profile)
    seqs = (list(range(65500, 65536)) + list(range(0, 40)) + [65530, 10, 10, 5, 20000, 30, 40000, 60000, 65535, 0]
            + list(range(64000, 65536, 97)) + list(range(0, 3000, 89)))
    outcomes = []
    for ssrc in (0x77, 0xFFFFFFFE):
        for i, seq in enumerate(seqs):
            try:
                srtp = sender.protect(packet(seq, ssrc, rng, csrcs=i % 2, extension=i % 3 == 1))
            except pylibsrtp.Error:
                continue  # too old for the sender's window already
            if i % 11 == 5:  # forged: one bit flipped, in the header, the payload or the tag
                where = rng.randrange(len(srtp))
                srtp = srtp[:where] + bytes([srtp[where] ^ (1 << rng.randrange(8))]) + srtp[where + 1:]
            try:
                expected = ref.unprotect(srtp)
            except pylibsrtp.Error:
                expected = None
            try:
                got = fast.unprotect(srtp)
            except _fast.Error:
                got = None
            assert got == expected, (ssrc, i, seq)
            outcomes.append(expected is not None)
    assert 0.4 * len(outcomes) < sum(outcomes) < len(outcomes)  # both outcomes were compared
    for short in (b"", bytes(12), b"\x80" * 21):
        with pytest.raises(_fast.Error):
            fast.unprotect(short)


def test_protect_refuses_what_is_not_rtp():
    fast = _fast.SrtpContext(bytes(30), 1)
    for bad in (b"", b"\x80" * 5, b"\x40" + bytes(20), struct.pack("!BBHII", 0x8F, 96, 1, 1, 1)):
        with pytest.raises(_fast.Error):
            fast.protect(bad)
    with pytest.raises(_fast.Error):
        fast.protect(struct.pack("!BBHII", 0x80, 96, 1, 1, 1) + bytes(3000))
    with pytest.raises(ValueError):
        _fast.SrtpContext(bytes(29), 1)
    with pytest.raises(ValueError):
        _fast.SrtpContext(bytes(30), 2)


def _udp_pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    rx.settimeout(2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    return rx, tx


def _drain(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(4096) for _ in range(count)]


def test_forward_writes_the_downtrack_header_and_batches_one_sendmmsg_per_socket():
    """Output.forward == DownTrack's header rewrite + pylibsrtp protect; queued datagrams leave on flush, one
    sendmmsg per socket, in order per destination."""
    rng = random.Random(7)
    key = rng.randbytes(30)
    ref = reference(key, 1)
    (rx1, tx1), (rx2, tx2) = _udp_pair(), _udp_pair()
    scheduled = []
    batch = _fast.Batch(64, lambda: scheduled.append(1))
    sender = _fast.SrtpContext(key, 1)
    outputs = [_fast.Output(batch, sender, tx.fileno(), "127.0.0.1", rx.getsockname()[1])
               for tx, rx in ((tx1, rx1), (tx2, rx2))]
    sent: list[list[bytes]] = [[], []]
    up = UpTrack("TR_x", "video", "video/VP8", 90000, 96, None, lambda ssrc: None, lambda ssrc, seqs: None)
    for i in range(40):
        seq = (65520 + i) & 0xFFFF  # across the wrap
        src = packet(seq, 0x51, rng, csrcs=i % 2)
        if i % 5 == 0:  # padded: the padding bit and bytes must survive
            src = bytes([src[0] | 0x20]) + src[1:] + b"\x00\x00\x03"
        _, _, seq_in, ts_in, marker, off, _ = rtp.parse(src)
        which = i % 2
        ssrc, pt = (0xA0 + which), (100 + which)
        out_seq, out_ts = (seq_in + 1000 * which) & 0xFFFF, (ts_in + 7) & 0xFFFFFFFF
        outputs[which].forward(src, off, out_seq, out_ts, marker, pt, ssrc)
        captured = []
        down = DownTrack(up, captured.append, pt, ssrc=ssrc)
        down.seq_off, down.ts_off = (out_seq - seq_in) & 0xFFFF, 7
        down.current, down.waiting_keyframe, down.switch_seq = "layer", False, seq_in
        down.write("layer", src[0], marker, seq_in, ts_in, src[off:], False)
        sent[which].append(ref.protect(captured[0]))
    assert scheduled == [1] and batch.count == 40
    assert batch.flush() == 40
    assert batch.count == 0 and batch.syscalls == 2 and batch.dropped == 0
    assert _drain(rx1, 20) == sent[0]
    assert _drain(rx2, 20) == sent[1]
    assert outputs[0].packets == 20 and outputs[0].bytes == sum(map(len, sent[0]))
    for sock in (rx1, tx1, rx2, tx2):
        sock.close()


def test_full_batch_flushes_itself_and_a_closed_socket_only_loses_its_own_datagrams():
    key = bytes(range(30))
    rx, tx = _udp_pair()
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batch = _fast.Batch(8)
    sender = _fast.SrtpContext(key, 1)
    good = _fast.Output(batch, sender, tx.fileno(), "127.0.0.1", rx.getsockname()[1])
    gone = _fast.Output(batch, sender, dead.fileno(), "127.0.0.1", rx.getsockname()[1])
    dead.close()
    base = struct.pack("!BBHII", 0x80, 96, 0, 0, 9)
    for seq in range(12):
        good.send(base[:2] + struct.pack("!H", seq) + base[4:] + b"x" * 100)
        gone.send(base[:2] + struct.pack("!H", seq) + base[4:] + b"y" * 100)
    batch.flush()
    assert batch.sent == 12 and batch.dropped == 12
    inbound = reference(key, 1, inbound=True)
    got = [rtp.parse(inbound.unprotect(d))[2] for d in _drain(rx, 12)]
    assert got == list(range(12))
    with pytest.raises(ValueError):
        _fast.Output(batch, sender, tx.fileno(), "::1", 5000)
    unbound = _fast.Output(batch)
    assert not unbound.bound
    with pytest.raises(_fast.Error):
        unbound.send(base + b"z")
    unbound.bind(sender, tx.fileno(), "127.0.0.1", rx.getsockname()[1])
    assert unbound.bound
    unbound.unbind()
    assert not unbound.bound
    rx.close()
    tx.close()


def _queue_mixed_sizes(batch, tx: socket.socket, receivers: list[socket.socket], key: bytes) -> list[list[int]]:
    """Interleaved datagrams for three destinations: a 70-packet frame of one size with a shorter packet and more
    after it (past the 64 segments one message may carry), sizes at random, and 60 of 1100 bytes (past the bytes
    one message may carry). Returns each destination's sequence numbers in the order queued."""
    rng = random.Random(5)
    sender = _fast.SrtpContext(key, 1)
    outputs = [_fast.Output(batch, sender, tx.fileno(), "127.0.0.1", rx.getsockname()[1]) for rx in receivers]
    sizes = [[1000] * 70 + [400] + [1000] * 5, [rng.randint(1, 1200) for _ in range(40)], [1100] * 60]
    queued: list[list[int]] = [[], [], []]
    for i in range(max(map(len, sizes))):
        for which, output in enumerate(outputs):
            if i < len(sizes[which]):
                seq = which * 1000 + i
                output.send(struct.pack("!BBHII", 0x80, 96, seq, 0, 0x70 + which) + bytes(sizes[which][i]))
                queued[which].append(seq)
    return queued


def test_a_destinations_run_of_equal_sized_datagrams_leaves_as_one_message():
    """With GSO (the default), each destination's consecutive datagrams of one size go to the kernel as one
    message it segments: every receiver gets exactly the datagrams, in the order queued, that it gets without."""
    key = bytes(range(30))
    got = {}
    for gso in (False, True):
        receivers = [_udp_pair()[0] for _ in range(3)]
        tx = _udp_pair()[1]
        batch = _fast.Batch(1024, gso=gso)
        queued = _queue_mixed_sizes(batch, tx, receivers, key)
        assert batch.flush() == sum(map(len, queued)) and batch.dropped == 0
        assert batch.syscalls == 1  # one socket: one sendmmsg
        inbound = reference(key, 1, inbound=True)
        got[gso] = [_drain(rx, len(q)) for rx, q in zip(receivers, queued)]
        for datagrams, want in zip(got[gso], queued):
            assert [rtp.parse(inbound.unprotect(d))[2] for d in datagrams] == want
        if gso:
            # 76 -> 64 + 7 (the shorter one ends a message) + 5; 60 x 1100 -> 59 + 1; random sizes: mostly alone
            assert batch.gso_messages >= 4 and batch.gso
        else:
            assert batch.gso_messages == 0
        for sock in (*receivers, tx):
            sock.close()
    assert got[True] == got[False]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a network namespace")
def test_datagrams_over_a_small_mtu_are_sent_one_by_one():
    """A path whose MTU is below the datagrams' size refuses them as one segmented message (EMSGSIZE): the batch
    sends those one at a time (the kernel fragments them), loses none, and keeps segmenting elsewhere. Run in a
    network namespace of its own whose loopback has an MTU of 1280."""
    script = (
        "import socket, struct\n"
        "from braid.services.media.fastpath import _fastpath as f\n"
        "rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(('127.0.0.1', 0)); rx.settimeout(2)\n"
        "tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); tx.bind(('127.0.0.1', 0))\n"
        "b = f.Batch(16)\n"
        "out = f.Output(b, f.SrtpContext(bytes(30), 1), tx.fileno(), '127.0.0.1', rx.getsockname()[1])\n"
        "for i in range(3): out.send(struct.pack('!BBHII', 0x80, 96, i, 0, 9) + bytes(1300))\n"
        "print(b.flush(), b.dropped, b.gso, [len(rx.recv(4000)) for _ in range(3)])\n"
    )
    result = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo mtu 1280 up && {sys.executable} -c \"$0\"",
                             script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("[")[0].split() == ["3", "0", "1"], result.stdout
    assert result.stdout.strip().endswith("[1322, 1322, 1322]")  # 12 + 1300 + the 10-byte tag, result.stdout


def _sections(pc: PeerTransport, setup: str) -> str:
    sections = [sdp.Section(kind="video", mid="0", direction="sendrecv", codecs=[sdp.Codec(96, "VP8", 90000)])]
    return sdp.write(sections, pc.local_transport(setup), 1, 1)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
async def test_peer_transport_sends_through_the_chosen_path_across_a_rollover(compiled):
    """Two PeerTransports over loopback: RTP from one reaches the other intact across a sequence wrap, through
    the compiled path (DTLS keys exported to C, batched sendmmsg) or the pure-Python one. The sender is a node
    on its shared UDP port, the receiver a client with a socket of its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    node = await node_ice_host("127.0.0.1", udp_port, 0, PortRange(41040, 41049, host="127.0.0.1"))
    client = IceHost.port_range(PortRange(41050, 41060, host="127.0.0.1"), "127.0.0.1")
    cert = RTCCertificate.generateCertificate()
    received: list[bytes] = []
    path = fastpath.choose(compiled)
    a = PeerTransport(ice=node, certificate=cert, offerer=True, label="a",
                      on_rtp=lambda d: None, on_rtcp=lambda d: None, on_state=lambda s: None, send_path=path)
    b = PeerTransport(ice=client, certificate=cert, offerer=False, label="b",
                      on_rtp=received.append, on_rtcp=lambda d: None, on_state=lambda s: None)
    try:
        await a.prepare()
        await b.prepare()
        b.set_remote(sdp.parse(_sections(a, "actpass")), is_offer=True)
        a.set_remote(sdp.parse(_sections(b, b.answer_setup)), is_offer=False)
        for _ in range(300):
            if a.state == b.state == "connected":
                break
            await asyncio.sleep(0.02)
        assert a.state == b.state == "connected"
        sent = []
        for i in range(300):
            sent.append(rtp.HEADER.pack(0x80, 96, (65400 + i) & 0xFFFF, 3000 * i, 4321) + os.urandom(200))
            a.send_rtp(sent[-1])
            if i % 20 == 19:
                await asyncio.sleep(0.005)  # let the batch flush and the receiver read
        for _ in range(200):
            if len(received) >= len(sent):
                break
            await asyncio.sleep(0.01)
        assert received == sent
        assert a.packets_out == 300 and (a.output is not None and a.output.bound) == compiled
        assert a.ice_conn._nominated[1].local_candidate.port == udp_port
    finally:
        await a.close()
        await b.close()
        node.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["recvmmsg", "recvfrom"])
async def test_burst_endpoint_drains_every_ready_datagram_per_wake_up(compiled):
    """The media node's sockets: a burst is read in one go, datagrams keep their
    order and source address, sendto works, close reports connection_lost once."""
    from braid.services.media.fastpath.endpoint import create_endpoint

    class Recorder(asyncio.DatagramProtocol):
        def __init__(self):
            self.got, self.lost, self.wakeups = [], 0, 0
            self.transport = None

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.got.append((data, addr))

        def connection_lost(self, exc):
            self.lost += 1

    transport, proto = await create_endpoint(Recorder, ("127.0.0.1", 0), compiled=compiled)
    assert proto.transport is transport
    port = transport.get_extra_info("sockname")[1]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    reads = []
    original = transport._deliver
    transport._deliver = lambda: reads.append(original()) or reads[-1]  # count deliveries per wake-up
    for i in range(200):
        peer.sendto(i.to_bytes(2, "big") * 50, ("127.0.0.1", port))
    for _ in range(100):
        if len(proto.got) == 200:
            break
        await asyncio.sleep(0.005)
    assert [int.from_bytes(d[:2], "big") for d, _ in proto.got] == list(range(200))
    assert {a for _, a in proto.got} == {peer.getsockname()}
    assert len([r for r in reads if r]) <= 3  # one burst, at most a few wake-ups
    transport.sendto(b"pong", peer.getsockname())
    await asyncio.sleep(0.01)
    assert peer.recv(100) == b"pong"
    transport.close()
    transport.close()
    await asyncio.sleep(0.01)
    assert proto.lost == 1 and transport.is_closing()
    peer.close()



@pytest.mark.parametrize("compiled", [True, False], ids=["recvmmsg", "recvfrom"])
async def test_a_datagram_the_protocol_cannot_handle_never_stops_the_shared_socket(compiled):
    """The node's one UDP port serves every participant: a protocol error on one datagram (a stranger's malformed
    STUN, say) is logged and the socket keeps reading the rest of the burst and everything after it."""
    from braid.services.media.fastpath.endpoint import create_endpoint

    class Fragile(asyncio.DatagramProtocol):
        def __init__(self):
            self.got = []

        def datagram_received(self, data, addr):
            if data == b"poison":
                raise ValueError("cannot parse")
            self.got.append(data)

    transport, proto = await create_endpoint(Fragile, ("127.0.0.1", 0), compiled=compiled)
    port = transport.get_extra_info("sockname")[1]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for data in (b"a", b"poison", b"b"):
            peer.sendto(data, ("127.0.0.1", port))
        await asyncio.sleep(0.05)
        peer.sendto(b"later", ("127.0.0.1", port))
        for _ in range(100):
            if b"later" in proto.got:
                break
            await asyncio.sleep(0.005)
        assert proto.got == [b"a", b"b", b"later"]
    finally:
        transport.close()
        peer.close()


def test_a_strangers_malformed_stun_is_dropped_not_raised():
    """aioice raises struct.error on a short attribute; the mux counts such a datagram as dropped."""
    import struct

    from braid.services.media.icemux import _parse_stun

    attribute = struct.pack("!HH", 0x8028, 2) + b"\x00\x00\x00\x00"  # FINGERPRINT claiming 2 bytes
    header = struct.pack("!HHI", 0x0001, len(attribute), 0x2112A442) + os.urandom(12)
    assert _parse_stun(header + attribute) is None


def _simulcast_stream(rng: random.Random):
    """Packets of a 3-layer VP8 track: (layer index, packet), keyframes every 40 packets per layer, a sequence
    wrap, and each layer numbering its pictures on its own (15-bit picture ids and TL0PICIDX from a random start,
    7-bit ones on the top layer; three temporal layers; every 50th packet a truncated descriptor)."""
    seqs = [65000, 100, 30000]
    pids = [rng.randrange(0x8000) for _ in seqs]
    tl0s = [rng.randrange(256) for _ in seqs]
    for i in range(400):
        for index in range(3):
            seq = (seqs[index] + i) & 0xFFFF
            keyframe = i % 40 == 0
            pid, tl0 = pids[index] + i // 4, (tl0s[index] + i // 4) & 0xFF
            picture = bytes([pid & 0x7F]) if index == 2 else bytes([0x80 | (pid >> 8) & 0x7F, pid & 0xFF])
            tid = (0, 2, 1, 2)[(i // 4) % 4]  # L1T3, layer sync on the first TL1 and TL2 after TL0
            layers = bytes([(tid << 6) | (0x20 if (i // 4) % 4 in (1, 2) else 0)])
            descriptor = bytes([0x90 | (0x10 if i % 4 == 0 else 0), 0xE0]) + picture + bytes([tl0]) + layers
            if i % 50 == 7:
                descriptor = descriptor[:3]
            body = descriptor + bytes([0x00 if keyframe else 0x01]) + rng.randbytes(rng.randint(20, 1100))
            marker = 1 if i % 4 == 3 else 0
            yield index, rtp.HEADER.pack(0x80, (marker << 7) | 96, seq, (i // 4) * 3000 + index, 0x100 + index) + body


def _scenario(up: UpTrack, downs: list[DownTrack], step: int) -> None:
    """What the control plane does to subscribers while media flows: quality changes, pause/resume, rebinding."""
    if step == 200:
        downs[1].set_max_fps(8)  # temporal layers left out (in Python), from once their rates are measured
    elif step == 300:
        downs[0].set_max_quality(0)
    elif step == 450:
        downs[1].pause()
    elif step == 600:
        downs[1].resume()
        downs[0].set_max_quality(2)
    elif step == 700:
        downs[2].bound = False
    elif step == 760:
        downs[2].bind()
    elif step == 813:  # a probe's padding between two packets of the top layer that arrive swapped
        downs[0].send_padding(3, 255)
    elif step == 900:
        up.reassign()
    elif step == 1000:
        downs[1].set_max_fps(0)  # every picture again: back to plain forwarding


def test_compiled_fanout_sends_what_downtrack_write_sends():
    """The same publisher stream and the same control events through two identical up-tracks, one whose
    subscribers send through bound Outputs (fanout in C) and one through DownTrack.write and pylibsrtp: the same
    SRTP bytes leave for every subscriber, layer switches, pauses, a sequence wrap, and a late packet after a
    probe's padding (which C leaves to Python) included."""
    import braid.services.media.forward as forward

    rng = random.Random(11)
    keys = [rng.randbytes(30) for _ in range(3)]
    rxs = [_udp_pair() for _ in keys]
    batch = _fast.Batch(4096)
    outputs = []
    for key, (rx, tx) in zip(keys, rxs):
        out = _fast.Output(batch)
        out.bind(_fast.SrtpContext(key, 1), tx.fileno(), "127.0.0.1", rx.getsockname()[1])
        outputs.append(out)
    refs = [reference(key, 1) for key in keys]
    reference_out: list[list[bytes]] = [[] for _ in keys]
    python_writes: list[int] = []

    def counted(down: DownTrack):
        write = down.write

        def wrapped(*args) -> None:
            if not down.python_only:  # a thinned stream is Python's on purpose
                python_writes.append(1)
            write(*args)
        return wrapped

    def build(compiled: bool):
        up = UpTrack("TR_x", "video", "video/VP8", 90000, 96, None, lambda ssrc: None, lambda ssrc, seqs: None)
        for index, rid in enumerate("qhf"):
            up.add_layer(0x100 + index, rid)
        downs = []
        for i in range(3):
            if compiled:  # as PeerTransport.send_rtp does: through the same Output
                send = outputs[i].send
            else:
                send = (lambda packet, i=i: reference_out[i].append(refs[i].protect(packet)))
            down = Vp8DownTrack(up, send, 100 + i, ssrc=0xA00 + i, output=outputs[i] if compiled else None)
            down.last_seq, down.last_ts = 1000 * i, 5000 * i
            if compiled:  # count what fanout leaves to Python
                down.write = counted(down)
            up.add_down(down)
            downs.append(down)
        return up, downs

    thinned = 0  # packets that came while a subscriber had temporal layers left out
    clock = [1000.0]
    real_monotonic = forward.time.monotonic
    forward.time.monotonic = lambda: clock[0]
    try:
        fast_up, fast_downs = build(True)
        ref_up, ref_downs = build(False)
        stream = list(_simulcast_stream(rng))
        stream[812], stream[815] = stream[815], stream[812]  # the earlier one arrives after the padding
        for step, (index, pkt) in enumerate(stream):
            clock[0] += 0.004  # about 21 pictures a second per layer
            for up, downs in ((fast_up, fast_downs), (ref_up, ref_downs)):
                _scenario(up, downs, step)
                layer = up.by_ssrc[0x100 + index]
                up.on_packet(layer, pkt, rtp.parse(pkt))
            thinned += ref_downs[1].thinning is not None and ref_downs[1].thinning.top < 2
    finally:
        forward.time.monotonic = real_monotonic
    assert fast_downs[0].padding_sent and ref_downs[0].padding_sent, "the probe's padding (after a frame's end)"
    batch.flush()
    for i, (rx, tx) in enumerate(rxs):
        got = _drain(rx, len(reference_out[i]))
        diff = [(k, a[:12].hex(), b[:12].hex()) for k, (a, b) in enumerate(zip(got, reference_out[i])) if a != b]
        assert got == reference_out[i], (i, diff[:6])
        rx.settimeout(0.05)
        with pytest.raises(OSError):
            rx.recv(4096)  # nothing more than the reference sent
        f, r = fast_downs[i], ref_downs[i]
        assert (f.packets, f.octets, f.last_seq, f.last_ts) == (r.packets, r.octets, r.last_seq, r.last_ts)
        assert (f.pid_off, f.tl0_off, f.last_pid, f.last_tl0) == (r.pid_off, r.tl0_off, r.last_pid, r.last_tl0)
        fsr, rsr = f.sender_report(clock[0]), r.sender_report(clock[0])
        assert fsr[:8] + fsr[16:] == rsr[:8] + rsr[16:]  # all but the NTP time (wall clock, read twice)
        rx.close()
        tx.close()
    assert all(len(o) > 100 for o in reference_out)
    assert len(python_writes) < 0.05 * sum(map(len, reference_out))  # the steady state ran in C
    assert thinned > 100 and not fast_downs[1].python_only  # thinned for a while, then handed back to C


def test_a_layer_keeps_flowing_past_half_the_sequence_space_on_both_paths():
    """A subscriber that stays on one layer: 32768 packets after the point it joined that layer at, every packet
    looked older than that point, and nothing was forwarded for the next 32768 (a 720p layer froze after about
    three minutes, in C and in Python alike). A probe's padding early on, and a late packet long after, included."""
    batch = _fast.Batch(4096)
    rx, tx = _udp_pair()
    output = _fast.Output(batch)
    output.bind(_fast.SrtpContext(bytes(30), 1), tx.fileno(), "127.0.0.1", rx.getsockname()[1])
    python_sent: list[bytes] = []
    python_writes: list[int] = []
    pairs = []
    for compiled in (True, False):
        up = UpTrack("TR_v", "video", "video/VP8", 90000, 96, None, lambda ssrc: None, lambda ssrc, seqs: None)
        layer = up.add_layer(0x77)
        down = Vp8DownTrack(up, output.send if compiled else python_sent.append, 96, ssrc=0xB0,
                            output=output if compiled else None)
        down.last_seq = 500
        if compiled:
            write = down.write
            down.write = lambda *args, write=write: (python_writes.append(args[3]), write(*args))
        up.add_down(down)
        pairs.append((up, layer, down))
    total = 70_000
    late = 50_000
    try:
        for i in range(total):
            seq = (40_000 + i) & 0xFFFF
            order = [i] if i not in (late, late + 1) else [late + 1] if i == late else [late]
            for j in order:
                seq = (40_000 + j) & 0xFFFF
                body = (b"\x10\x00" if j == 0 else b"\x10\x01") + bytes(40)
                pkt = rtp.HEADER.pack(0x80, (j % 2) << 7 | 96, seq, (j // 2) * 3000, 0x77) + body
                for up, layer, down in pairs:
                    up.on_packet(layer, pkt, rtp.parse(pkt))
                    if j == 101:  # after a frame's last packet
                        assert down.send_padding(2, 255)
            if i % 1000 == 0:
                batch.flush()
                rx.setblocking(False)
                try:
                    while rx.recv(4096):
                        pass
                except BlockingIOError:
                    pass
    finally:
        rx.close()
        tx.close()
    fast, ref = pairs[0][2], pairs[1][2]
    assert ref.packets == fast.packets == total, (fast.packets, ref.packets)
    assert fast.last_seq == ref.last_seq == (500 + total + 2) & 0xFFFF  # every packet and the padding, in order
    seqs = [rtp.parse(p)[2] for p in python_sent[-2000:]]
    assert seqs == [(seqs[0] + k) & 0xFFFF for k in range(2000)]
    assert not ref.padded and ref.pad_boundary == -1, "the probe's padding is forgotten once far behind"
    assert len(python_writes) < 20, "C hands Python the keyframe, the late pair, and one packet per horizon move"


def test_compiled_transport_wide_numbers_match_the_python_stamp():
    """With transport-wide feedback negotiated, the compiled Output numbers each packet in the ring it shares with
    twcc.SentPackets: the same bytes as twcc.stamped + pylibsrtp (no extension yet, a one-byte block, a two-byte
    block, CSRCs), one sequence across both paths, and the send time and size recorded for each."""
    rng = random.Random(11)
    key = rng.randbytes(30)
    ref = reference(key, 1)
    rx, tx = _udp_pair()
    batch = _fast.Batch(64)
    out = _fast.Output(batch, _fast.SrtpContext(key, 1), tx.fileno(), "127.0.0.1", rx.getsockname()[1])
    sent = twcc.SentPackets(5)
    out.set_twcc(5, sent.ring)
    expected = []
    for i in range(30):
        src = packet(1000 + i, 0x77, rng, csrcs=i % 3, extension=i % 3 == 1)
        if i % 3 == 2:
            src = rtp.with_extension(src[0], 0, 96, 1000 + i, 5, 0x77, 20, bytes(18)) + rng.randbytes(100)
        if i % 2:  # through the Python path: the same ring goes on numbering
            stamped = sent.stamp(src, 0)
        else:
            out.send(src)
            stamped = twcc.stamped(src, 5, i)
        assert twcc.transport_seq(stamped, 5) == i
        expected.append(ref.protect(stamped))
    batch.flush()
    got = _drain(rx, 15)
    assert got == expected[0::2]
    for i in range(0, 30, 2):
        assert sent.sent(i) is not None and sent.sent(i)[1] == len(expected[i]) - 10  # before the SRTP tag
    with pytest.raises(ValueError):
        out.set_twcc(5, bytearray(10))
    out.set_twcc(0, None)
    src = packet(2000, 0x77, rng)
    out.send(src)
    batch.flush()
    assert rx.recv(4096) == ref.protect(src)  # no longer numbered
    rx.close()
    tx.close()
