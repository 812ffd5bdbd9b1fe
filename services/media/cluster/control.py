"""Node-to-node media relay, the control plane: the `Relay.Link` gRPC stream.

* `OriginConnection` (subscribing node): one per origin node. Opens the stream with fresh SRTP keys and its relay
  socket, subscribes the tracks local subscribers want and keeps the origin told which quality caps they want
  (coalesced: one update per changed track, whatever the rate of changes), applies the layer SSRCs, the layers
  relayed now and the sender reports the origin announces, and re-establishes the link (new keys) after it broke,
  for as long as some track is still wanted.
* `RelayServicer` (origin node): accepts links, attaches and detaches `RelaySink`s on the published tracks, sets
  the layers each carries from its node's demand, and announces layers, sender reports and tracks that went away.
  The link ends with its stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc

from braid.rpc import cluster_pb2, cluster_pb2_grpc, common_pb2

from ..forward import HIGHEST
from .relay import InboundLink, OutboundLink, RelaySink, new_key, parse_demand
from .sealing import SealError, seal, unseal
from ..interfaces import Cluster

if TYPE_CHECKING:
    from .relayed import RelayedTrack

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 5.0
RETRY_MIN, RETRY_MAX = 0.25, 5.0
LINGER = 10.0  # an origin connection with nothing wanted is closed after this long


def layers_message(sink: RelaySink) -> cluster_pb2.RelayDown:
    return cluster_pb2.RelayDown(layers=cluster_pb2.RelayLayers(track_sid=sink.track_sid, layers=[
        cluster_pb2.RelayLayer(rid=rid, quality=quality, ssrc=ssrc) for rid, quality, ssrc in sink.layers()
    ], forwarding_ssrcs=sink.forwarding_ssrcs()))


# --- subscribing side ------------------------------------------------------------------------------------------


class OriginConnection:
    def __init__(self, cluster: Cluster, node_id: str, address: str):
        self.cluster = cluster
        self.node_id = node_id
        self.address = address
        self.tracks: dict[str, RelayedTrack] = {}
        self.link: InboundLink | None = None
        self._writes: asyncio.Queue[cluster_pb2.RelayUp | None] = asyncio.Queue()  # None: send changed demands
        self._demand_changed: set[str] = set()
        self._task: asyncio.Task | None = None
        self.idle_since = time.monotonic()
        self.connected = False
        self.failures = 0
        self.closed = False

    def __repr__(self) -> str:
        return f"origin {self.node_id} ({self.address})"

    # --- demand ------------------------------------------------------------------------------------------------

    def want(self, track: RelayedTrack) -> None:
        self.tracks[track.sid] = track
        self.idle_since = 0.0
        if self.connected:
            self._writes.put_nowait(_subscribe(track))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"relay-origin-{self.node_id}")

    def unwant(self, track: RelayedTrack) -> None:
        if self.tracks.get(track.sid) is not track:
            return
        del self.tracks[track.sid]
        track.unmap(self.link)
        if self.connected:
            self._writes.put_nowait(cluster_pb2.RelayUp(unsubscribe=cluster_pb2.RelayUnsubscribe(
                room=track.room, track_sid=track.sid)))
        if not self.tracks:
            self.idle_since = time.monotonic()

    def demand(self, track: RelayedTrack) -> None:
        """The caps `track`'s subscribers here want changed: tell the origin (the latest value, once)."""
        if not self.connected or self.tracks.get(track.sid) is not track:
            return  # the (re)subscription carries it
        if not self._demand_changed:
            self._writes.put_nowait(None)
        self._demand_changed.add(track.sid)

    def idle(self, now: float) -> bool:
        return not self.tracks and self.idle_since and now - self.idle_since > LINGER

    def pli(self, ssrc: int) -> None:
        if self.link is not None:
            self.link.pli(ssrc)

    def nack(self, ssrc: int, seqs: list[int]) -> None:
        if self.link is not None:
            self.link.nack(ssrc, seqs)

    # --- the stream ----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = RETRY_MIN
        while self.tracks and not self.closed:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.info("%s: relay link ended: %s", self, exc.code())
            except (asyncio.TimeoutError, ConnectionError, OSError, ValueError) as exc:
                log.info("%s: relay link failed: %r", self, exc)
            except Exception:
                log.exception("%s: relay link failed", self)
            finally:
                self._teardown()
            if not self.tracks or self.closed:
                return
            self.failures += 1
            delay = RETRY_MIN if time.monotonic() - started > 10 else min(RETRY_MAX, delay * 2)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        endpoint = self.cluster.endpoint
        key_down, key_up = new_key(), new_key()
        link = InboundLink(endpoint, self.node_id, key_down, key_up)
        stub = cluster_pb2_grpc.RelayStub(self.cluster.channels.channel(self.address))
        call = stub.Link()
        try:
            sealing, me = self.cluster.sealing_key, self.cluster.node_id
            await asyncio.wait_for(call.write(cluster_pb2.RelayUp(open=cluster_pb2.LinkOpen(
                node_id=me, host=endpoint.host, port=endpoint.port,
                key_down=seal(sealing, key_down, me), key_up=seal(sealing, key_up, me)))), OPEN_TIMEOUT)
            first = await asyncio.wait_for(call.read(), OPEN_TIMEOUT)
            if first is grpc.aio.EOF or first.WhichOneof("message") != "accept":
                detail = first.error.msg if first is not grpc.aio.EOF and first.HasField("error") else "no accept"
                raise ConnectionError(f"origin refused the link: {detail}")
            link.addr = (first.accept.host, first.accept.port)
            endpoint.add_inbound(link)
            self.link = link
            self._writes = asyncio.Queue()
            self._demand_changed.clear()
            self.connected = True
            log.info("%s: relay link up (%s:%d)", self, *link.addr)
            for track in list(self.tracks.values()):
                track.unmap(None)
                await call.write(_subscribe(track))
            writer = asyncio.create_task(self._write(call), name=f"relay-write-{self.node_id}")
            try:
                while True:
                    down = await call.read()
                    if down is grpc.aio.EOF:
                        return
                    self._on_down(link, down)
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
        finally:
            call.cancel()

    async def _write(self, call) -> None:
        while True:
            message = await self._writes.get()
            if message is not None:
                await call.write(message)
                continue
            changed, self._demand_changed = self._demand_changed, set()
            for sid in changed:
                track = self.tracks.get(sid)
                if track is not None:
                    await call.write(cluster_pb2.RelayUp(demand=cluster_pb2.RelayDemandUpdate(
                        room=track.room, track_sid=sid, demand=cluster_pb2.RelayDemand(max_qualities=track.wanted))))

    def _on_down(self, link: InboundLink, down: cluster_pb2.RelayDown) -> None:
        kind = down.WhichOneof("message")
        if kind == "layers":
            track = self.tracks.get(down.layers.track_sid)
            if track is not None:
                track.apply_layers(link, down.layers.layers, down.layers.forwarding_ssrcs)
        elif kind == "reports":
            for report in down.reports.reports:
                entry = link.by_ssrc.get(report.ssrc)
                if entry is not None and entry[1] is not None:
                    layer = entry[1]
                    layer.sr_ntp, layer.sr_rtp, layer.sr_at = report.ntp, report.rtp_ts, time.monotonic()
        elif kind == "gone":
            track = self.tracks.get(down.gone.track_sid)
            if track is not None:
                log.debug("%s: %s gone at the origin: %s", self, track, down.gone.reason)
                track.unmap(link)
        elif kind == "error":
            log.info("%s: relay error: %s", self, down.error.msg)

    def _teardown(self) -> None:
        self.connected = False
        if self.link is not None:
            for track in self.tracks.values():
                track.unmap(self.link)
            self.link.close()
            self.link = None

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._teardown()


def _subscribe(track: RelayedTrack) -> cluster_pb2.RelayUp:
    return cluster_pb2.RelayUp(subscribe=cluster_pb2.RelaySubscribe(
        room=track.room, track_sid=track.sid, demand=cluster_pb2.RelayDemand(max_qualities=track.wanted)))


# --- origin side -----------------------------------------------------------------------------------------------


class RelayServicer(cluster_pb2_grpc.RelayServicer):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    async def Link(self, request_iterator, context):
        stream = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(stream.__anext__(), OPEN_TIMEOUT)
        except (StopAsyncIteration, asyncio.TimeoutError):
            return
        if first.WhichOneof("message") != "open":
            yield _error("invalid_argument", "a relay link must begin with LinkOpen")
            return
        request = first.open
        out: asyncio.Queue[cluster_pb2.RelayDown | None] = asyncio.Queue()
        endpoint = self.cluster.endpoint
        try:
            sealing = self.cluster.sealing_key
            key_down = unseal(sealing, request.key_down, request.node_id)
            key_up = unseal(sealing, request.key_up, request.node_id)
        except SealError as exc:
            log.warning("relay link from %s refused: %s", request.node_id, exc)
            yield _error("unauthenticated", str(exc))
            return
        try:
            link = OutboundLink(endpoint, request.node_id, (request.host, request.port), key_down, key_up,
                                on_layers=lambda sink: out.put_nowait(layers_message(sink)))
        except (ValueError, Exception) as exc:  # a bad key
            yield _error("invalid_argument", f"cannot open the link: {exc}")
            return
        link.control = out.put_nowait
        endpoint.add_outbound(link)
        self.cluster.outbound.add(link)
        log.info("relay link to %s (%s:%d) accepted", request.node_id, request.host, request.port)
        reader = asyncio.create_task(self._read(link, stream, out), name=f"relay-serve-{request.node_id}")
        try:
            yield cluster_pb2.RelayDown(accept=cluster_pb2.LinkAccept(
                node_id=self.cluster.node_id, host=endpoint.host, port=endpoint.port))
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            link.close()
            self.cluster.outbound.discard(link)
            log.info("relay link to %s closed (%d PLI, %d NACK, %d retransmitted)", request.node_id, link.plis,
                     link.nacks, link.retransmits)

    async def _read(self, link: OutboundLink, stream, out: asyncio.Queue) -> None:
        try:
            async for up in stream:
                kind = up.WhichOneof("message")
                if kind == "subscribe":
                    found = self.cluster.local_track(up.subscribe.room, up.subscribe.track_sid)
                    if found is None:
                        out.put_nowait(cluster_pb2.RelayDown(gone=cluster_pb2.RelayTrackGone(
                            track_sid=up.subscribe.track_sid, reason="not published here")))
                        continue
                    wants = parse_demand(up.subscribe.demand.max_qualities) if up.subscribe.HasField(
                        "demand") else (HIGHEST,)
                    sink = link.attach(found.up, up.subscribe.track_sid, wants)
                    out.put_nowait(layers_message(sink))
                elif kind == "unsubscribe":
                    link.detach(up.unsubscribe.track_sid)
                elif kind == "demand":
                    link.set_demand(up.demand.track_sid, parse_demand(up.demand.demand.max_qualities))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the subscribing node went away
            log.debug("relay link to %s: stream ended: %r", link.peer, exc)
        out.put_nowait(None)


def origin_tick(link: OutboundLink) -> None:
    """Once a second on the origin: sender reports, and tracks whose publisher stopped."""
    control = link.control
    if control is None:
        return
    for sid, sink in list(link.sinks.items()):
        if sink.up.closed:
            link.detach(sid)
            control(cluster_pb2.RelayDown(gone=cluster_pb2.RelayTrackGone(track_sid=sid, reason="unpublished")))
    reports = link.sender_reports()
    if reports:
        control(cluster_pb2.RelayDown(reports=cluster_pb2.RelaySenderReports(reports=[
            cluster_pb2.RelaySenderReport(ssrc=ssrc, ntp=ntp, rtp_ts=rtp_ts) for ssrc, ntp, rtp_ts in reports
        ])))


def _error(code: str, msg: str) -> cluster_pb2.RelayDown:
    return cluster_pb2.RelayDown(error=common_pb2.RpcError(code=code, msg=msg))
