"""The forwarding core: one `UpTrack` per published track; each subscriber gets its copy (`downtrack.DownTrack`).

Per received packet the up-track parses the fixed header once, stores the packet for retransmission, and each
down-track writes a new 12-byte header (its own SSRC, sequence numbers and timestamps, the subscriber's payload
type) in front of the shared payload and sends it on its subscriber's transport. Media is never decoded; the only
payload bytes read are the first few of a video packet, to find keyframes.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from . import rtcp, rtp
from .fastpath import fan_out

log = logging.getLogger(__name__)

_pack = rtp.HEADER.pack
KEYFRAME_REQUEST_INTERVAL = 0.5
UPSTREAM_NACK_INTERVAL = 0.1
LAYER_IDLE_AFTER = 1.5
MAX_NACK_BURST = 32
RELAY_SWITCH_TIMEOUT = 4.0  # a relay switching layers stops the old one after this long even without a keyframe
QUALITY_OF_RID = {"q": 0, "h": 1, "f": 2}
HIGHEST = 2
AUDIO_BUFFER = 256  # ~5 s of 20 ms Opus packets: what a NACK can still get back


class Receiver(Protocol):
    """What an up-track uses of each subscriber's copy of it (downtrack.DownTrack)."""

    current: Layer | None
    target: Layer | None
    paused: bool
    waiting_keyframe: bool
    followup_keyframe: bool

    @property
    def max_quality(self) -> int: ...

    def write(self, layer: Layer, b0: int, marker: int, seq: int, ts: int, payload: bytes, keyframe: bool) -> None:
        ...

    def skip(self, layer: Layer, seq: int) -> None: ...

    def close(self) -> None: ...


class PacketBuffer:
    """The last `size` packets of one stream, by original sequence number."""

    __slots__ = ("mask", "seqs", "packets")

    def __init__(self, size: int = 1024):
        assert size & (size - 1) == 0
        self.mask = size - 1
        self.seqs = [-1] * size
        self.packets: list[bytes | None] = [None] * size

    def put(self, seq: int, packet: bytes) -> None:
        i = seq & self.mask
        self.seqs[i] = seq
        self.packets[i] = packet

    def get(self, seq: int) -> bytes | None:
        i = seq & self.mask
        return self.packets[i] if self.seqs[i] == seq else None


class Layer:
    """One received RTP stream of a track (one simulcast encoding), with its receive statistics."""

    __slots__ = (
        "rid", "quality", "ssrc", "rtx_ssrc", "buffer", "subs", "packets", "bytes", "last_at", "base_seq",
        "max_seq", "cycles", "expected_prior", "received_prior", "jitter", "transit", "sr_ntp", "sr_rtp", "sr_at",
        "keyframe_requested_at", "nacked", "first_at", "woke_at", "relays", "bitrate", "_rate_mark", "__weakref__",
    )

    def __init__(self, rid: str, quality: int, ssrc: int, video: bool):
        self.rid = rid
        self.quality = quality
        self.ssrc = ssrc
        self.rtx_ssrc = 0
        self.buffer = PacketBuffer() if video else PacketBuffer(AUDIO_BUFFER)
        self.subs: list[Receiver] = []
        self.relays: list[LayerRelay] = []  # the relays carrying this layer to other media nodes
        self.packets = self.bytes = 0
        self.first_at = self.last_at = 0.0
        self.woke_at = 0.0  # when packets last started again after LAYER_IDLE_AFTER without any
        self.base_seq = self.max_seq = -1
        self.cycles = 0
        self.expected_prior = self.received_prior = 0
        self.jitter = 0.0
        self.transit = None
        self.sr_ntp = self.sr_rtp = 0
        self.sr_at = 0.0
        self.keyframe_requested_at = 0.0
        self.nacked: dict[int, float] = {}
        self.bitrate = 0.0  # bits per second received, over the last tick it was received in (dynacast may stop it)
        self._rate_mark: tuple[int, float] | None = None

    def measure(self, now: float) -> None:
        mark = self._rate_mark
        if mark is not None and now > mark[1] and self.bytes > mark[0]:
            self.bitrate = (self.bytes - mark[0]) * 8 / (now - mark[1])
        self._rate_mark = (self.bytes, now)

    def lost(self) -> int:
        """Packets missing from the sequence since the first one (never negative)."""
        if self.max_seq < 0:
            return 0
        return max(0, self.cycles + self.max_seq - self.base_seq + 1 - self.packets)

    def active(self, now: float) -> bool:
        return self.packets > 0 and now - self.last_at < LAYER_IDLE_AFTER

    def report_block(self, now: float) -> rtcp.ReportBlock | None:
        if self.max_seq < 0:
            return None
        extended = self.cycles + self.max_seq
        expected = extended - self.base_seq + 1
        lost = max(0, expected - self.packets)
        interval_expected = expected - self.expected_prior
        interval_received = self.packets - self.received_prior
        self.expected_prior, self.received_prior = expected, self.packets
        interval_lost = interval_expected - interval_received
        fraction = (interval_lost << 8) // interval_expected if interval_expected > 0 and interval_lost > 0 else 0
        lsr = (self.sr_ntp >> 16) & 0xFFFFFFFF if self.sr_at else 0
        dlsr = int((now - self.sr_at) * 65536) if self.sr_at else 0
        return rtcp.ReportBlock(self.ssrc, min(fraction, 255), lost, extended, int(self.jitter), lsr, dlsr)


class UpTrack:
    """A published track as received: its layers, their retransmission buffers, and its subscribers."""

    def __init__(
        self,
        track_sid: str,
        kind: str,
        mime: str,
        clock_rate: int,
        pt: int,
        rtx_pt: int | None,
        request_keyframe: Callable[[int], None],
        request_nack: Callable[[int, list[int]], None],
    ):
        self.track_sid = track_sid
        self.kind = kind
        self.video = kind == "video"
        self.mime = mime
        self.clock_rate = clock_rate
        self.pt = pt
        self.rtx_pt = rtx_pt
        self._request_keyframe = request_keyframe
        self._request_nack = request_nack
        self.layers: list[Layer] = []
        self.by_ssrc: dict[int, Layer] = {}
        self.rtx_by_ssrc: dict[int, Layer] = {}
        self.downs: list[Receiver] = []
        self.muted = False
        self.closed = False
        self.expected_rids: list[str] = []
        self.levels = None  # speakers.AudioLevel for audio tracks with the level extension
        self.plis_sent = 0
        self.nacks_sent = 0
        self.relays: list[LayerRelay] = []  # copies for other media nodes (cluster.relay.RelaySink)
        self.dd_id = 0  # the header extension id its packets carry the SVC dependency descriptor under (0: none)

    # --- layers --------------------------------------------------------------------------------------------

    def add_layer(self, ssrc: int, rid: str = "") -> Layer:
        layer = self.by_ssrc.get(ssrc)
        if layer is not None:
            return layer
        if rid in QUALITY_OF_RID:
            quality = QUALITY_OF_RID[rid]
        elif rid and rid in self.expected_rids:
            quality = self.expected_rids.index(rid)
        else:
            quality = len(self.layers)
        layer = Layer(rid, quality, ssrc, self.video)
        self.layers.append(layer)
        self.layers.sort(key=lambda l: l.quality)
        self.by_ssrc[ssrc] = layer
        self.reassign()
        return layer

    def add_rtx(self, rtx_ssrc: int, layer: Layer) -> None:
        layer.rtx_ssrc = rtx_ssrc
        self.rtx_by_ssrc[rtx_ssrc] = layer

    def layer_by_rid(self, rid: str) -> Layer | None:
        for layer in self.layers:
            if layer.rid == rid:
                return layer
        return None

    def active_layers(self, now: float) -> list[Layer]:
        """The layers a subscriber may be given now: those receiving packets (all, while none does)."""
        return [l for l in self.layers if l.active(now)] or self.layers

    def pick_layer(self, max_quality: int, now: float) -> Layer | None:
        if not self.layers:
            return None
        active = self.active_layers(now)
        below = [l for l in active if l.quality <= max_quality]
        return below[-1] if below else active[0]

    def reassign(self, now: float | None = None) -> None:
        """Recompute which layer every subscriber (and relay) should get, and which layers' fan-out lists hold
        it."""
        now = time.monotonic() if now is None else now
        for layer in self.layers:
            layer.subs = []
        for down in self.downs:
            target = self.pick_layer(down.max_quality, now)
            down.target = target
            if down.current is not None and down.current is not target and down.current in self.layers:
                down.current.subs.append(down)
            if target is not None:
                target.subs.append(down)
                if down.current is not target and self.video:
                    self.request_keyframe(target)
        self.route_relays(now)

    def demand(self) -> list[int]:
        """The quality caps this track's receivers want: each active local subscriber's, and every relay's
        (what the subscribers on its node want). Empty: nobody receives it now."""
        caps = [down.max_quality for down in self.downs if not down.paused]
        for relay in self.relays:
            caps.extend(relay.wants)
        return caps

    def demand_changed(self) -> None:
        """A subscriber paused, resumed or changed its cap (hook: a relayed track tells its origin)."""

    # --- relays to other media nodes ------------------------------------------------------------------------

    def add_relay(self, relay: LayerRelay) -> None:
        if relay not in self.relays:
            self.relays.append(relay)
        self.route_relays()

    def remove_relay(self, relay: LayerRelay) -> None:
        if relay in self.relays:
            self.relays.remove(relay)
            self.route_relays()

    def _relay_targets(self, relay: LayerRelay, now: float) -> frozenset[Layer]:
        """For each cap the relay's node wants, the layer a local subscriber with that cap would get."""
        return frozenset(layer for layer in (self.pick_layer(cap, now) for cap in relay.wants) if layer is not None)

    def route_relays(self, now: float | None = None) -> None:
        """Recompute which layers each relay carries; the per-layer lists are replaced, never mutated, so a
        packet being fanned out meanwhile is unaffected."""
        now = time.monotonic() if now is None else now
        carried: dict[Layer, list[LayerRelay]] = {}
        for relay in self.relays:
            for layer in relay.retarget(self._relay_targets(relay, now), now):
                self.request_keyframe(layer)  # the other node's subscribers start on this layer
            for layer in relay.carried():
                carried.setdefault(layer, []).append(relay)
        for layer in self.layers:
            layer.relays = carried.get(layer, [])

    def request_keyframe(self, layer: Layer | None = None, force: bool = False) -> None:
        if not self.video:
            return
        now = time.monotonic()
        for target in [layer] if layer is not None else self.layers:
            if force or now - target.keyframe_requested_at >= KEYFRAME_REQUEST_INTERVAL:
                target.keyframe_requested_at = now
                self.plis_sent += 1
                log.debug("%s: keyframe requested on %s", self.track_sid, target.ssrc)
                self._request_keyframe(target.ssrc)

    # --- packets -------------------------------------------------------------------------------------------

    def on_rtx(self, layer: Layer, data: bytes, header) -> None:
        """A retransmission on the RTX stream: restore the original packet (RFC 4588) and handle it."""
        ssrc, pt, seq, ts, marker, off, end = header
        if end - off < 2:
            return  # padding-only probe
        osn = (data[off] << 8) | data[off + 1]
        original = _pack(0x80, (marker << 7) | self.pt, osn, ts, layer.ssrc) + data[off + 2:end]
        parsed = rtp.parse(original)
        if parsed is not None:
            self.on_packet(layer, original, parsed, retransmitted=True)

    def on_packet(self, layer: Layer, data: bytes, header, retransmitted: bool = False) -> None:
        ssrc, pt, seq, ts, marker, off, end = header
        now = time.monotonic()
        if not retransmitted:
            self._track_sequence(layer, seq, ts, now)
            if self.levels is not None:
                self.levels.observe(data)
        woke = now - layer.last_at >= LAYER_IDLE_AFTER  # a layer (re)starting: receivers may want it now
        layer.packets += 1
        layer.bytes += len(data)
        layer.last_at = now
        if layer.buffer is not None:
            layer.buffer.put(seq, data)
        if woke:
            layer.woke_at = now
            if self.downs or self.relays:
                self.reassign(now)
        if self.muted:
            return
        for relay in layer.relays:  # padding too: the other node numbers its subscribers' streams the same way
            relay.write(layer, data, header)
        if end <= off:  # padding only: the publisher probing its uplink
            for down in layer.subs:
                down.skip(layer, seq)
            return
        if not layer.subs:
            return
        keyframe = self.video and rtp.is_keyframe(self.mime, data[off:off + 24])
        fan_out(layer.subs, layer, data, off, marker, seq, ts, keyframe, now)  # DownTrack.write for each

    def _track_sequence(self, layer: Layer, seq: int, ts: int, now: float) -> None:
        if layer.max_seq < 0:
            layer.base_seq = layer.max_seq = seq
            layer.first_at = now
        else:
            diff = (seq - layer.max_seq) & 0xFFFF
            if 0 < diff < 0x8000:
                if seq < layer.max_seq:
                    layer.cycles += 0x10000
                if diff > 1:
                    missing = [(layer.max_seq + i) & 0xFFFF for i in range(1, min(diff, MAX_NACK_BURST + 1))]
                    self.nack_upstream(layer, missing, now)
                layer.max_seq = seq
        transit = now * self.clock_rate - ts
        if layer.transit is not None:
            d = abs(transit - layer.transit)
            if d < self.clock_rate:  # ignore timestamp jumps (e.g. after a mute)
                layer.jitter += (d - layer.jitter) / 16
        layer.transit = transit

    def nack_upstream(self, layer: Layer, seqs: list[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        wanted = [s for s in seqs if now - layer.nacked.get(s, 0.0) >= UPSTREAM_NACK_INTERVAL]
        if not wanted:
            return
        for s in wanted:
            layer.nacked[s] = now
        if len(layer.nacked) > 512:
            layer.nacked = {s: t for s, t in layer.nacked.items() if now - t < 1.0}
        self.nacks_sent += 1
        self._request_nack(layer.ssrc, wanted)

    def on_sender_report(self, layer: Layer, packet: rtcp.Packet) -> None:
        layer.sr_ntp, layer.sr_rtp, layer.sr_at = packet.ntp, packet.rtp_ts, time.monotonic()

    # --- subscribers ---------------------------------------------------------------------------------------

    def add_down(self, down: Receiver) -> None:
        if down not in self.downs:
            self.downs.append(down)
            self.reassign()

    def remove_down(self, down: Receiver) -> None:
        if down in self.downs:
            self.downs.remove(down)
            self.reassign()

    def tick(self, now: float) -> None:
        """Once a second: follow layers that started or stopped."""
        for layer in self.layers:
            layer.measure(now)
        changed = any(down.target is not self.pick_layer(down.max_quality, now) for down in self.downs)
        if changed:
            self.reassign(now)
        elif any(relay.forwarding != self._relay_targets(relay, now) or relay.switch_expired(now)
                 for relay in self.relays):
            self.route_relays(now)
        for down in self.downs:
            if self.video and down.target is not None:
                if down.waiting_keyframe:
                    self.request_keyframe(down.target)
                elif down.followup_keyframe and down.current is not None and (
                        now - down.current.keyframe_requested_at >= KEYFRAME_REQUEST_INTERVAL):
                    down.followup_keyframe = False  # only once it can really be sent (requests are throttled)
                    self.request_keyframe(down.current)

    def close(self) -> None:
        self.closed = True
        for down in list(self.downs):
            down.close()
        self.downs.clear()
        for layer in self.layers:
            layer.subs = []
            layer.relays = []
        self.relays = []


class LayerRelay:
    """Which layers of an up-track one relay (a copy for another media node) carries: for each quality cap its
    node's subscribers want, the layer a local subscriber with that cap would get. On a switch the layers it
    leaves keep flowing until each new layer has passed a keyframe (or `RELAY_SWITCH_TIMEOUT`), so the
    subscribers there switch without a gap, as a local subscriber does. Subclasses send the packets."""

    __slots__ = ("up", "wants", "forwarding", "retiring", "awaiting", "switched_at")

    def __init__(self, up: UpTrack, wants: tuple[int, ...] = (HIGHEST,)):
        self.up = up
        self.wants = wants
        self.forwarding: frozenset[Layer] = frozenset()
        self.retiring: frozenset[Layer] = frozenset()
        self.awaiting: set[Layer] = set()
        self.switched_at = 0.0

    def set_wants(self, wants: tuple[int, ...]) -> None:
        if wants != self.wants:
            self.wants = wants
            self.up.route_relays()

    def carried(self) -> frozenset[Layer]:
        return self.forwarding | self.retiring

    def retarget(self, targets: frozenset[Layer], now: float) -> frozenset[Layer]:
        """Carry `targets` from now on; returns the layers newly started."""
        if targets == self.forwarding:
            return frozenset()
        added = targets - self.forwarding
        dropped = self.forwarding - targets
        self.forwarding = targets
        if added and dropped and self.up.video:
            self.retiring |= dropped
            self.awaiting |= added
            self.switched_at = now
        self.retiring -= targets
        self.awaiting &= targets
        if not self.awaiting or not targets:
            self.retiring, self.awaiting = frozenset(), set()
        self.forwarding_changed()
        return added

    def forwarding_changed(self) -> None:
        """Hook: the layers it forwards changed (the relay tells the node it feeds)."""

    def switch_expired(self, now: float) -> bool:
        if self.retiring and now - self.switched_at > RELAY_SWITCH_TIMEOUT:
            self.retiring, self.awaiting = frozenset(), set()
            return True
        return False

    def passed(self, layer: Layer, payload: bytes) -> None:
        """While switching: a packet of `layer` went out (`payload`: its first bytes); a keyframe there ends the
        wait for it."""
        if layer in self.awaiting and rtp.is_keyframe(self.up.mime, payload):
            self.awaiting.discard(layer)
            if not self.awaiting:
                self.retiring = frozenset()
                self.up.route_relays()

    def write(self, layer: Layer, data: bytes, header) -> None:
        raise NotImplementedError
