"""A participant's published tracks: `add_track` bookkeeping, binding offered m-lines to tracks, and the
receive side of the forwarding path (SSRC → layer demultiplexing, RTCP towards the publisher)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.shared import ids

from . import bwe, negotiation, rtcp, rtp, sdp, twcc
from .dynacast import Dynacast
from .forward import QUALITY_OF_RID, Layer, UpTrack
from .permissions import SubscriptionPermission
from .speakers import AudioLevel
from .negotiation import scalable
from .interfaces import Participant


log = logging.getLogger(__name__)

MAX_UNKNOWN_SSRCS = 64
FEEDBACK_INTERVAL = 0.1
REMB_INTERVAL = 0.25  # how often the estimate for a publisher without transport-wide feedback is revised
REMB_REFRESH = 1.0  # a REMB goes out at least this often, and at once when the estimate falls by REMB_DROP
REMB_DROP = 0.03


@dataclass
class PublishedTrack:
    info: models.TrackInfo
    kind: str
    mid: str
    codec: sdp.Codec
    rtx: sdp.Codec | None
    up: UpTrack
    subscribed_notified: bool = False
    subscribers: set[str] = field(default_factory=set)  # subscriber participant sids
    dynacast: Dynacast | None = None
    access: SubscriptionPermission = field(default_factory=SubscriptionPermission)  # its publisher's, shared

    @property
    def sid(self) -> str:
        return self.info.sid


class Publisher:
    def __init__(self, participant: Participant, moved_tracks: Sequence[models.TrackInfo] = ()):
        self.p = participant
        # Tracks this participant published on the node it moved from: republished, each keeps its sid, so the
        # move is invisible to subscribers' bookkeeping and to webhooks (the same track_published id).
        self.moved_tracks = list(moved_tracks)
        self.pending: dict[str, rtc_pb.AddTrackRequest] = {}  # cid → request
        self.pending_sids: dict[str, str] = {}  # cid → the TR_ sid promised in track_published
        self.tracks: dict[str, PublishedTrack] = {}  # sid → track
        self.by_mid: dict[str, PublishedTrack] = {}
        self.ssrc_map: dict[int, tuple[UpTrack, Layer, bool]] = {}
        self.unknown_ssrcs: set[int] = set()
        self.ext_ids: dict[str, int] = {}
        self.rtcp_ssrc = random.randint(1, 0xFFFFFFFF)
        self.twcc_id = 0  # the publisher's transport-wide sequence number extension, 0: not negotiated
        self.arrivals = twcc.ArrivalRecorder(self.rtcp_ssrc)
        self._feedback_timer: asyncio.TimerHandle | None = None
        self.uplink = bwe.ReceiveSideBwe()  # for REMB, when there is no transport-wide feedback
        self._remb_timer: asyncio.TimerHandle | None = None
        self._remb_sent = (0.0, 0.0)  # (bits per second, when)
        self.newly_published: list[PublishedTrack] = []
        self.access = SubscriptionPermission()  # who may subscribe to these tracks
        self._reported: dict[object, tuple[int, ...]] = {}  # counters already reported to the stats worker

    # --- add_track -----------------------------------------------------------------------------------------

    def add_track(self, req: rtc_pb.AddTrackRequest) -> rtc_pb.TrackPublishedResponse | None:
        if not req.cid:
            return None
        if req.cid in self.pending:
            return rtc_pb.TrackPublishedResponse(cid=req.cid, track=self._track_info(req, self.pending_sids[req.cid]))
        if any(t.info.sid == req.sid for t in self.tracks.values()) and req.sid:
            return None
        self.pending[req.cid] = req
        self.pending_sids[req.cid] = self._moved_sid(req) or ids.track_sid()
        return rtc_pb.TrackPublishedResponse(cid=req.cid, track=self._track_info(req, self.pending_sids[req.cid]))

    def _moved_sid(self, req: rtc_pb.AddTrackRequest) -> str:
        for i, old in enumerate(self.moved_tracks):
            if (old.type, old.source, old.name) == (req.type, req.source, req.name):
                del self.moved_tracks[i]
                return old.sid
        return ""

    @staticmethod
    def _track_info(req: rtc_pb.AddTrackRequest, sid: str) -> models.TrackInfo:
        return models.TrackInfo(
            sid=sid,
            type=req.type,
            name=req.name,
            muted=req.muted,
            width=req.width,
            height=req.height,
            simulcast=len(req.layers) > 1 or bool(req.simulcast_codecs),
            disable_dtx=req.disable_dtx,
            source=req.source,
            layers=req.layers,
            stereo=req.stereo,
            disable_red=req.disable_red,
            encryption=req.encryption,
            stream=req.stream,
            audio_features=req.audio_features,
            backup_codec_policy=req.backup_codec_policy,
            packet_trailer_features=req.packet_trailer_features,
        )

    # --- offers --------------------------------------------------------------------------------------------

    def remember_extensions(self, session: sdp.Session) -> None:
        for media in session.media:
            for ext_id, uri in media.extmaps.items():
                if uri in (rtp.EXT_MID, rtp.EXT_RID, rtp.EXT_RRID):
                    self.ext_ids.setdefault(uri, ext_id)
                elif uri == twcc.EXT_TRANSPORT_CC and media.kind in ("audio", "video") and not self.twcc_id:
                    self.twcc_id = ext_id

    def stopped_mids(self, session: sdp.Session) -> list[PublishedTrack]:
        """Tracks whose m-line no longer sends: the client unpublished them."""
        gone = []
        for mid, track in self.by_mid.items():
            media = session.by_mid(mid)
            if media is None or media.rejected or not media.sends:
                gone.append(track)
        return gone

    def answer(self, media: sdp.Media) -> sdp.Section:
        """Answer a sendonly/sendrecv m-line: bind it to a pending track, or refuse it (inactive)."""
        bound = self.by_mid.get(media.mid)
        if bound is not None:
            return negotiation.publish_section(media, negotiation.PublishCodec(
                bound.codec, bound.rtx, bound.info.stereo, not bound.info.disable_dtx))
        req = self._match_pending(media)
        if req is None:
            log.info("%s: offered m-line %s sends an unannounced track; answering inactive", self.p, media.mid)
            return negotiation.inactive_section(media)
        preferred = req.simulcast_codecs[0].codec if req.simulcast_codecs else ""
        chosen = negotiation.choose_publish_codec(media, allow_red=not req.disable_red, preferred=preferred)
        if chosen is None:
            log.info("%s: no forwardable codec on m-line %s", self.p, media.mid)
            self.pending.pop(req.cid, None)
            self.p.send_request_response(rtc_pb.RequestResponse(
                reason=rtc_pb.RequestResponse.UNSUPPORTED_TYPE, message="codec not supported", add_track=req))
            return negotiation.inactive_section(media)
        if media.kind == "audio":  # what the publisher encodes follows our answer: the track's stereo and DTX
            chosen.stereo, chosen.dtx = req.stereo, not req.disable_dtx
            chosen.codec = negotiation.opus_params(chosen.codec, chosen.stereo, chosen.dtx)
        del self.pending[req.cid]
        sid = self.pending_sids.pop(req.cid)
        info = self._track_info(req, sid)
        mime = chosen.mime(media.kind)
        info.mime_type = mime
        info.mid = media.mid
        info.codecs.append(models.SimulcastCodecInfo(mime_type=mime, mid=media.mid, cid=req.cid, layers=req.layers))
        up = UpTrack(
            sid, media.kind, mime, chosen.codec.clock, chosen.codec.pt, chosen.rtx.pt if chosen.rtx else None,
            request_keyframe=self._send_pli, request_nack=self._send_nack,
        )
        up.expected_rids = [r.rid for r in media.rids if r.direction == "send"]
        if scalable(chosen.codec):
            up.dd_id = media.extmap_id(rtp.EXT_DEPENDENCY_DESCRIPTOR) or 0
        level_id = media.extmap_id(rtp.EXT_AUDIO_LEVEL)
        if media.kind == "audio" and level_id is not None:
            up.levels = AudioLevel(level_id)
        up.muted = req.muted
        track = PublishedTrack(info, media.kind, media.mid, chosen.codec, chosen.rtx, up, access=self.access)
        if up.video and len(up.expected_rids) > 1:
            track.dynacast = Dynacast(sid, mime.split("/")[-1].lower())
        self._register_sdp_ssrcs(track, media)
        self.tracks[sid] = track
        self.by_mid[media.mid] = track
        self.newly_published.append(track)
        return negotiation.publish_section(media, chosen)

    def _match_pending(self, media: sdp.Media) -> rtc_pb.AddTrackRequest | None:
        track_id = media.msid_track_id()
        if track_id and track_id in self.pending:
            return self.pending[track_id]
        want = models.TrackType.AUDIO if media.kind == "audio" else models.TrackType.VIDEO
        for req in self.pending.values():
            if req.type == want:
                return req
        return None

    def _register_sdp_ssrcs(self, track: PublishedTrack, media: sdp.Media) -> None:
        """Non-simulcast libwebrtc senders announce their SSRC (and RTX via FID) in the SDP."""
        if media.rids:
            return
        rtx_of: dict[int, int] = {}
        for semantics, ssrcs in media.ssrc_groups:
            if semantics == "FID" and len(ssrcs) == 2:
                rtx_of[ssrcs[1]] = ssrcs[0]
        for ssrc in media.ssrcs:
            if ssrc in rtx_of:
                continue
            layer = track.up.add_layer(ssrc, "")
            self.ssrc_map[ssrc] = (track.up, layer, False)
        for rtx_ssrc, main in rtx_of.items():
            entry = self.ssrc_map.get(main)
            if entry is not None:
                track.up.add_rtx(rtx_ssrc, entry[1])
                self.ssrc_map[rtx_ssrc] = (track.up, entry[1], True)

    def take_newly_published(self) -> list[PublishedTrack]:
        out, self.newly_published = self.newly_published, []
        return out

    def remove(self, track: PublishedTrack) -> None:
        self.tracks.pop(track.sid, None)
        if self.by_mid.get(track.mid) is track:
            del self.by_mid[track.mid]
        for ssrc in [s for s, entry in self.ssrc_map.items() if entry[0] is track.up]:
            del self.ssrc_map[ssrc]
            self.uplink.forget(ssrc)
        track.up.close()

    # --- packets from the publisher ------------------------------------------------------------------------

    def on_rtp(self, data: bytes) -> None:
        header = rtp.parse(data)
        if header is None:
            return
        if self.twcc_id:
            self._arrived(data, header[0])
        entry = self.ssrc_map.get(header[0])
        if entry is None:
            entry = self._learn(data, header)
            if entry is None:
                return
        up, layer, is_rtx = entry
        if is_rtx:
            up.on_rtx(layer, data, header)
        elif header[1] == up.pt:
            if up.video and not self.twcc_id:
                self._estimate_uplink(data, header, up.clock_rate)
            up.on_packet(layer, data, header)
        elif header[1] == up.rtx_pt:
            up.on_rtx(layer, data, header)

    def _arrived(self, data: bytes, ssrc: int) -> None:
        """Remember when a packet with a transport-wide number arrived; feedback about it goes within
        FEEDBACK_INTERVAL, so the publisher's browser estimates its uplink from it."""
        seq = twcc.transport_seq(data, self.twcc_id)
        if seq is None:
            return
        self.arrivals.on_packet(seq, ssrc, time.monotonic_ns() // 1000)
        if self._feedback_timer is None:
            self._feedback_timer = asyncio.get_running_loop().call_later(FEEDBACK_INTERVAL, self._send_feedback)

    def _send_feedback(self) -> None:
        self._feedback_timer = None
        for packet in self.arrivals.feedback():
            self.p.pub_pc_send_rtcp(packet)

    def _estimate_uplink(self, data: bytes, header, clock_rate: int) -> None:
        self.uplink.on_packet(header[0], header[2], header[3], len(data), time.monotonic_ns() // 1000, clock_rate)
        if self._remb_timer is None:
            self._remb_timer = asyncio.get_running_loop().call_later(REMB_INTERVAL, self._send_remb)

    def _send_remb(self) -> None:
        """Tell the publisher the estimate of its uplink: when it fell, at once; otherwise every REMB_REFRESH."""
        self._remb_timer = None
        now = time.monotonic()
        estimate = self.uplink.update(int(now * 1_000_000))
        video = [l.ssrc for t in self.tracks.values() if t.kind == "video" for l in t.up.layers]
        if not estimate or not video:
            return
        sent, sent_at = self._remb_sent
        if estimate < sent * (1 - REMB_DROP) or now - sent_at >= REMB_REFRESH:
            self.p.pub_pc_send_rtcp(rtcp.remb(self.rtcp_ssrc, int(estimate), video))
            self._remb_sent = (estimate, now)

    def _learn(self, data: bytes, header) -> tuple[UpTrack, Layer, bool] | None:
        ssrc, pt = header[0], header[1]
        if ssrc in self.unknown_ssrcs:
            return None
        exts = rtp.extensions(data)
        mid_id, rid_id, rrid_id = (self.ext_ids.get(u) for u in (rtp.EXT_MID, rtp.EXT_RID, rtp.EXT_RRID))
        track = None
        if mid_id is not None and mid_id in exts:
            track = self.by_mid.get(exts[mid_id].decode(errors="replace"))
        if track is None:
            candidates = [t for t in self.tracks.values() if pt in (t.up.pt, t.up.rtx_pt)]
            if len(candidates) == 1 and not candidates[0].up.layers:
                track = candidates[0]
        if track is None:
            if len(self.unknown_ssrcs) < MAX_UNKNOWN_SSRCS and mid_id is not None and mid_id in exts:
                self.unknown_ssrcs.add(ssrc)
            return None
        up = track.up
        limit = self.p.limits.max_layers_per_track
        rrid = exts.get(rrid_id) if rrid_id is not None else None
        rid = exts.get(rid_id) if rid_id is not None else None
        if rrid is not None or pt == up.rtx_pt:
            name = rrid.decode(errors="replace") if rrid is not None else ""
            layer = up.layer_by_rid(name) if name else (up.layers[0] if len(up.layers) == 1 else None)
            if layer is None:
                return None
            if limit and len(up.rtx_by_ssrc) >= limit:
                self._refuse_ssrc(ssrc, f"track {track.sid} already has {limit} RTX streams")
                return None
            up.add_rtx(ssrc, layer)
            entry = (up, layer, True)
        elif pt == up.pt:
            name = rid.decode(errors="replace") if rid is not None else ""
            if name and name not in QUALITY_OF_RID and name not in up.expected_rids:
                return None
            layer = up.layer_by_rid(name) if name else None
            if layer is None:
                if limit and len(up.layers) >= limit:
                    self._refuse_ssrc(ssrc, f"track {track.sid} already has {limit} layers")
                    return None
                layer = up.add_layer(ssrc, name)
            entry = (up, layer, False)
        else:
            return None
        self.ssrc_map[ssrc] = entry
        return entry

    def _refuse_ssrc(self, ssrc: int, why: str) -> None:
        """An SSRC past the layer limit: ignored from now on (the set itself is bounded)."""
        if len(self.unknown_ssrcs) < MAX_UNKNOWN_SSRCS:
            self.unknown_ssrcs.add(ssrc)
        self.p.refuse("layers", f"SSRC {ssrc} ignored: {why}")

    def on_rtcp(self, packet: rtcp.Packet) -> bool:
        """RTCP about a stream we receive (SR from the publisher); True when consumed."""
        if packet.type == rtcp.SR:
            entry = self.ssrc_map.get(packet.sender_ssrc)
            if entry is not None and not entry[2]:
                entry[0].on_sender_report(entry[1], packet)
                return True
        return False

    def _send_pli(self, media_ssrc: int) -> None:
        self.p.pub_pc_send_rtcp(rtcp.pli(self.rtcp_ssrc, media_ssrc))

    def _send_nack(self, media_ssrc: int, seqs: list[int]) -> None:
        self.p.pub_pc_send_rtcp(rtcp.nack(self.rtcp_ssrc, media_ssrc, seqs))

    def report(self, worker) -> None:
        """Upstream deltas since the previous report, per track, to the participant's stats worker."""
        now = time.monotonic()
        for track in self.tracks.values():
            up = track.up
            packets = octets = lost = 0
            jitter = 0.0
            best = -1
            for layer in up.layers:
                key = (track.sid, layer.ssrc)
                prev = self._reported.get(key, (0, 0, 0))
                total_lost = layer.lost()
                packets += layer.packets - prev[0]
                octets += layer.bytes - prev[1]
                lost += max(0, total_lost - prev[2])
                self._reported[key] = (layer.packets, layer.bytes, total_lost)
                jitter = max(jitter, layer.jitter * 1000 / up.clock_rate)
                if up.video and layer.active(now):
                    best = max(best, layer.quality)
            prev = self._reported.get(track.sid, (0, 0))
            self._reported[track.sid] = (up.nacks_sent, up.plis_sent)
            worker.on_upstream(track.sid, packets=packets, bytes=octets, packets_lost=lost,
                               nacks=up.nacks_sent - prev[0], plis=up.plis_sent - prev[1], jitter=jitter, layer=best)

    def audio_level(self) -> float:
        """This participant's loudest unmuted audio track over the last speaker interval."""
        level = 0.0
        for track in self.tracks.values():
            if track.up.levels is not None:
                value = track.up.levels.take()
                if not track.info.muted:
                    level = max(level, value)
        return level

    def tick(self, now: float) -> bytes | None:
        """Receiver reports for every received layer, as one compound RTCP packet."""
        blocks = []
        ssrcs = []
        for track in self.tracks.values():
            track.up.tick(now)
            if track.dynacast is not None:
                update = track.dynacast.update(track.up, now)
                if update is not None:
                    self.p.send(rtc_pb.SignalResponse(subscribed_quality_update=update))
            for layer in track.up.layers:
                block = layer.report_block(now)
                if block is not None:
                    blocks.append(block)
                    ssrcs.append(layer.ssrc)
        if not blocks:
            return None
        return rtcp.receiver_report(self.rtcp_ssrc, blocks)

    def close(self) -> None:
        for timer in (self._feedback_timer, self._remb_timer):
            if timer is not None:
                timer.cancel()
        self._feedback_timer = self._remb_timer = None
        for track in list(self.tracks.values()):
            track.up.close()
        self.tracks.clear()
        self.by_mid.clear()
        self.ssrc_map.clear()
        self.pending.clear()
