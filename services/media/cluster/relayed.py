"""A track published on another media node, as this node's subscribers see it.

`RelayedTrack.published` is an ordinary `PublishedTrack` whose up-track is fed by the relay instead of a publisher's
PeerConnection, so local subscribers attach to it exactly as to a local publisher's track. Its keyframe requests
and NACKs go back over the relay to the origin node, and so does its demand: the quality caps its subscribers
want (track_setting, adaptive-stream size, link loss), which decide the layers the origin relays and what the
origin's dynacast asks the publisher for.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from livekit.protocol import models

from braid.rpc import cluster_pb2

from .. import sdp
from ..forward import UpTrack
from ..publisher import PublishedTrack
from ..negotiation import scalable
from .relay import RELAY_DD_ID, parse_demand
from ..interfaces import RelayOrigin

if TYPE_CHECKING:
    from .relay import InboundLink

log = logging.getLogger(__name__)


def codec_to_spec(codec: sdp.Codec) -> cluster_pb2.RelayCodec:
    return cluster_pb2.RelayCodec(pt=codec.pt, name=codec.name, clock=codec.clock, channels=codec.channels,
                                  fmtp=codec.fmtp, feedback=list(codec.feedback))


def codec_from_spec(spec: cluster_pb2.RelayCodec) -> sdp.Codec:
    return sdp.Codec(spec.pt, spec.name, spec.clock, spec.channels, spec.fmtp, list(spec.feedback))


def track_spec(track: PublishedTrack) -> cluster_pb2.RelayTrackSpec:
    """How another node can receive `track` (a local publisher's) over the relay."""
    spec = cluster_pb2.RelayTrackSpec(track_sid=track.sid, kind=track.kind, mime=track.up.mime,
                                      codec=codec_to_spec(track.codec), expected_rids=list(track.up.expected_rids))
    if track.rtx is not None:
        spec.rtx.CopyFrom(codec_to_spec(track.rtx))
    return spec


class RelayedUpTrack(UpTrack):
    """An up-track fed by the relay; the first local subscriber that binds to it starts the relay, and every
    change of what its subscribers want is passed on."""

    def __init__(self, *args, on_demand, on_demand_change, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_demand = on_demand
        self._on_demand_change = on_demand_change
        self.wanted: tuple[int, ...] = ()
        self.forwarded: list | None = None  # the layers the origin relays now (None: not told yet)
        self.told_at = 0.0

    def active_layers(self, now: float):
        """Layers the origin says it relays, or that started arriving since it said so (its word and the first
        packets of a new layer race: UDP and the control stream). A layer it stopped relaying is left at once,
        though its last packets may still be arriving."""
        forwarded = self.forwarded
        if forwarded is None:
            return super().active_layers(now)
        eligible = [l for l in self.layers if l in forwarded or l.woke_at > self.told_at]
        return [l for l in eligible if l.active(now)] or eligible or self.layers

    def add_down(self, down) -> None:
        super().add_down(down)
        self._on_demand()

    def reassign(self, now: float | None = None) -> None:
        super().reassign(now)
        self.demand_changed()

    def demand_changed(self) -> None:
        wanted = parse_demand(self.demand())
        if wanted != self.wanted:
            self.wanted = wanted
            self._on_demand_change()


class RelayedTrack:
    def __init__(self, origin: RelayOrigin, room: str, publisher_sid: str, spec: cluster_pb2.RelayTrackSpec,
                 info: models.TrackInfo, on_subscribed: Callable[[], None] | None = None):
        self.origin = origin
        self.on_subscribed = on_subscribed  # the first local subscriber receives it (tells the publisher)
        self.room = room
        self.publisher_sid = publisher_sid
        self.sid = spec.track_sid
        codec = codec_from_spec(spec.codec)
        rtx = codec_from_spec(spec.rtx) if spec.HasField("rtx") else None
        up = RelayedUpTrack(
            spec.track_sid, spec.kind, spec.mime, codec.clock, codec.pt, rtx.pt if rtx else None,
            request_keyframe=self._keyframe, request_nack=self._nack, on_demand=self._bound,
            on_demand_change=self._demand_changed,
        )
        up.expected_rids = list(spec.expected_rids)
        if scalable(codec):
            up.dd_id = RELAY_DD_ID
        up.muted = info.muted
        own_info = models.TrackInfo()
        own_info.CopyFrom(info)
        self.published = PublishedTrack(own_info, spec.kind, "", codec, rtx, up)
        self.linked = False
        self.ssrcs: set[int] = set()
        self.idle_since = 0.0

    @property
    def up(self) -> RelayedUpTrack:
        return self.published.up  # type: ignore[return-value]

    @property
    def wanted(self) -> tuple[int, ...]:
        return self.up.wanted

    def __repr__(self) -> str:
        return f"relayed {self.published.kind} {self.sid} from {self.origin.node_id}"

    # --- demand ----------------------------------------------------------------------------------------------

    def _bound(self) -> None:
        self.want()
        if self.on_subscribed is not None:
            notify, self.on_subscribed = self.on_subscribed, None
            notify()

    def want(self) -> None:
        if not self.linked and not self.up.closed:
            if self.origin.closed:  # closed while nothing was wanted from that node: a fresh connection
                self.origin = self.origin.cluster.origin(self.origin.node_id, self.origin.address)
            self.linked = True
            self.idle_since = 0.0
            self.origin.want(self)

    def _demand_changed(self) -> None:
        if self.linked:
            self.origin.demand(self)

    def unwant(self) -> None:
        if self.linked:
            self.linked = False
            self.origin.unwant(self)

    def close(self) -> None:
        self.unwant()
        self.up.close()

    # --- from the origin --------------------------------------------------------------------------------------

    def apply_layers(self, link: InboundLink, layers, forwarding_ssrcs=()) -> None:
        """The origin's SSRCs for this track's layers on `link` (re-announced after a link is re-established),
        and which of them it relays now."""
        up = self.up
        if up.closed:
            return
        reorder = False
        for announced in layers:
            layer = up.by_ssrc.get(announced.ssrc)
            if layer is None:
                if announced.rid:
                    layer = up.layer_by_rid(announced.rid)
                elif len(up.layers) == 1 and not up.layers[0].rid:
                    layer = up.layers[0]  # the same single stream, announced again on a new link
            if layer is None:
                layer = up.add_layer(announced.ssrc, announced.rid)
            elif layer.ssrc != announced.ssrc:
                up.by_ssrc.pop(layer.ssrc, None)
                layer.ssrc = announced.ssrc
                up.by_ssrc[announced.ssrc] = layer
                layer.max_seq = -1  # a new link: restart sequence tracking (the origin's numbers continue)
            if layer.quality != announced.quality:
                layer.quality = announced.quality
                reorder = True
            link.by_ssrc[announced.ssrc] = (up, layer)
            self.ssrcs.add(announced.ssrc)
        forwarding = set(forwarding_ssrcs)
        up.forwarded = [layer for layer in up.layers if layer.ssrc in forwarding]
        up.told_at = time.monotonic()
        if reorder:
            up.layers.sort(key=lambda l: l.quality)
            up.reassign()
        elif up.downs:
            up.reassign()

    def unmap(self, link: InboundLink | None) -> None:
        if link is not None:
            for ssrc in self.ssrcs:
                link.by_ssrc.pop(ssrc, None)
        self.ssrcs.clear()
        self.up.forwarded = None

    # --- to the origin ----------------------------------------------------------------------------------------

    def _keyframe(self, ssrc: int) -> None:
        self.origin.pli(ssrc)

    def _nack(self, ssrc: int, seqs: list[int]) -> None:
        self.origin.nack(ssrc, seqs)

    # --- from the bus -----------------------------------------------------------------------------------------

    def update_info(self, info: models.TrackInfo) -> None:
        """The publisher's node announced new track info (mute, size)."""
        self.published.info.CopyFrom(info)
        up = self.up
        if info.muted != up.muted:
            up.muted = info.muted
            if not info.muted:
                for down in up.downs:
                    down.waiting_keyframe = True
                up.request_keyframe(force=True)
