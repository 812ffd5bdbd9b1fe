"""A participant's subscriptions: which published tracks it receives, on which m-line, and the negotiation
that puts them there.

* v1 (single PC): the client always offers. A track goes on a recvonly m-line the client offered and we never
  used before; when none is free we send `media_sections_requirement` and the client re-offers with more.
* v0 (dual PC): we offer on the subscriber PC, one sendonly m-line per track, and the client answers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from . import negotiation, red, rtcp, rtp, sdp
from .allocation import LinkAllocator, effective_priority
from .bwe import WARMUP, SendSideBwe
from .congestion import LinkProbes
from .downtrack import DownTrack, RepayloadingDownTrack, UnwrappingDownTrack, Vp8DownTrack
from .negotiation import scalable
from .svc import SvcDownTrack
from .interfaces import Participant

if TYPE_CHECKING:
    from .forward import UpTrack
    from .publisher import PublishedTrack

log = logging.getLogger(__name__)

MAX_BIND_ATTEMPTS = 3
QUALITY = {models.VideoQuality.LOW: 0, models.VideoQuality.MEDIUM: 1, models.VideoQuality.HIGH: 2}


@dataclass
class Subscription:
    track: PublishedTrack
    publisher_sid: str
    down: DownTrack | None = None
    mid: str = ""
    codec: sdp.Codec | None = None
    disabled: bool = False
    max_quality: int = 2
    priority: int = 0  # track_setting priority (0: unset; see allocation.py)
    max_fps: int = 0  # track_setting fps (0: every frame)
    attempts: int = 0
    offer_id: int = 0  # v0: the subscriber offer that announced it

    @property
    def kind(self) -> str:
        return self.track.kind

    @property
    def stream_id(self) -> str:
        return f"{self.publisher_sid}|{self.track.sid}"


@dataclass
class Slot:
    """A v0 subscriber-PC m-line we created; it keeps its mid and codec for the life of the PC."""

    mid: str
    kind: str
    codec: sdp.Codec | None
    sub: Subscription | None = None


class Subscriber:
    def __init__(self, participant: Participant, compiled: bool = False):
        """`compiled`: estimate its downlink with the compiled per-packet estimator (the node's send path is)."""
        self.p = participant
        self.subs: dict[str, Subscription] = {}  # track sid → subscription
        self.denied: dict[str, tuple[PublishedTrack, str]] = {}  # wanted, not permitted: track sid → (track, publisher sid)
        self.down_by_ssrc: dict[int, DownTrack] = {}
        self.cname = f"braid-{random.getrandbits(32):08x}"
        self.link_probes = LinkProbes()
        self.bwe = SendSideBwe(compiled=compiled)  # its downlink, from transport-wide feedback (when its client sends it)
        self.allocator = LinkAllocator()
        # v1
        self.used_mids: set[str] = set()
        self.free_mids: dict[str, list[str]] = {"audio": [], "video": []}
        self.requirement_sent = False
        self.allow_mixed = False  # the client's offer allows two-byte header extensions
        # v0
        self.slots: list[Slot] = []
        self.app_mid = ""
        self.offer_id = 0
        self.awaiting_answer = False
        self.needs_offer = False
        self.dirty = True
        self.session_id = random.randint(1, 1 << 62)
        self.sdp_version = 0
        self._kick: asyncio.Task | None = None
        self._reported: dict[int, tuple[int, int, int, int]] = {}

    # --- what to receive -----------------------------------------------------------------------------------

    def subscribe(self, track: PublishedTrack, publisher_sid: str) -> None:
        if track.sid in self.subs or track.up.closed or not self.p.may_subscribe_more():
            return
        if not track.access.allows(track.sid, self.p.identity):
            if track.sid not in self.denied:  # wanted, but the publisher does not allow it (yet)
                self.denied[track.sid] = (track, publisher_sid)
                self._permission_update(publisher_sid, track.sid, False)
            return
        if self.denied.pop(track.sid, None) is not None:
            self._permission_update(publisher_sid, track.sid, True)
        self.subs[track.sid] = Subscription(track, publisher_sid)
        self.dirty = True
        self.renegotiate()

    def recheck_permission(self, tracks: list[PublishedTrack]) -> None:
        """The publisher of `tracks` changed who may subscribe: cut off what is no longer allowed, and subscribe
        again to what was wanted and now is."""
        for track in tracks:
            allowed = track.access.allows(track.sid, self.p.identity)
            sub = self.subs.get(track.sid)
            if sub is not None and not allowed:
                self.unsubscribe(track.sid)
                self.subscribe(track, sub.publisher_sid)  # remembered as denied, and the client told
            elif allowed and track.sid in self.denied:
                self.subscribe(track, self.denied[track.sid][1])

    def _permission_update(self, publisher_sid: str, track_sid: str, allowed: bool) -> None:
        self.p.send(rtc_pb.SignalResponse(subscription_permission_update=rtc_pb.SubscriptionPermissionUpdate(
            participant_sid=publisher_sid, track_sid=track_sid, allowed=allowed)))

    def unsubscribe(self, track_sid: str) -> bool:
        self.denied.pop(track_sid, None)
        sub = self.subs.pop(track_sid, None)
        if sub is None:
            return False
        self._release(sub)
        self.dirty = True
        self.renegotiate()
        return True

    def _release(self, sub: Subscription) -> None:
        if sub.down is not None:
            self.down_by_ssrc.pop(sub.down.ssrc, None)
            sub.down.close()
            sub.down = None
        sub.track.subscribers.discard(self.p.sid)
        for slot in self.slots:
            if slot.sub is sub:
                slot.sub = None

    def update_settings(self, track_sid: str, disabled: bool, quality: int | None, priority: int = 0,
                        fps: int = 0) -> None:
        sub = self.subs.get(track_sid)
        if sub is None:
            return
        sub.disabled = disabled
        sub.priority, sub.max_fps = priority, fps
        if quality is not None:
            sub.max_quality = quality
        self._apply_settings(sub)

    def _apply_settings(self, sub: Subscription) -> None:
        if sub.down is None:
            return
        sub.down.priority = effective_priority(sub.priority, sub.track.info.source == models.TrackSource.SCREEN_SHARE)
        sub.down.set_max_fps(sub.max_fps)
        sub.down.set_max_quality(sub.max_quality)
        if sub.disabled:
            sub.down.pause()
        else:
            sub.down.resume()

    def _bind(self, sub: Subscription, mid: str, codec: sdp.Codec, bound: bool = True) -> None:
        pc = self.p.sub_pc
        sub.down = down_track(sub.track.up, pc.send_rtp, sub.track.codec, codec, output=pc.output)
        sub.down.bound = bound
        sub.down.send_rtcp = pc.send_rtcp
        sub.down.link_probes = self.link_probes
        sub.down.on_stream_state = lambda paused, sub=sub: self._stream_state(sub, paused)
        sub.offer_id = self.offer_id + 1
        while sub.down.ssrc in self.down_by_ssrc:
            sub.down.ssrc = random.randint(1, 0xFFFFFFFF)
        sub.mid, sub.codec = mid, codec
        self.down_by_ssrc[sub.down.ssrc] = sub.down
        sub.track.subscribers.add(self.p.sid)
        sub.track.up.add_down(sub.down)
        self._apply_settings(sub)
        self.p.on_subscribed(sub)

    def _stream_state(self, sub: Subscription, paused: bool) -> None:
        log.info("%s: %s %s", self.p, sub.track.sid, "paused: its link cannot carry it" if paused else "resumed")
        state = rtc_pb.StreamState.PAUSED if paused else rtc_pb.StreamState.ACTIVE
        self.p.send(rtc_pb.SignalResponse(stream_state_update=rtc_pb.StreamStateUpdate(stream_states=[
            rtc_pb.StreamStateInfo(participant_sid=sub.publisher_sid, track_sid=sub.track.sid, state=state)])))

    def outgoing(self, sub: Subscription) -> sdp.Outgoing:
        assert sub.down is not None
        return sdp.Outgoing(sub.down.ssrc, self.cname, sub.stream_id, sub.track.sid)

    def mid_to_track_id(self) -> dict[str, str]:
        return {s.mid: s.track.sid for s in self.subs.values() if s.down is not None and s.mid}

    def renegotiate(self) -> None:
        """Coalesce changes made in the same loop iteration into one negotiation round."""
        if self._kick is None or self._kick.done():
            self._kick = asyncio.create_task(self._renegotiate_soon())

    async def _renegotiate_soon(self) -> None:
        await asyncio.sleep(0.02)
        if self.p.closed:
            return
        if self.p.single_pc:
            self.send_requirement()
        else:
            await self.offer()

    # --- v1: answering the client's recvonly m-lines -------------------------------------------------------

    def begin_answer(self, allow_mixed: bool) -> None:
        self.free_mids = {"audio": [], "video": []}
        self.requirement_sent = False
        self.allow_mixed = allow_mixed

    def answer_slot(self, media: sdp.Media) -> sdp.Section:
        bound = next((s for s in self.subs.values() if s.mid == media.mid and s.down is not None), None)
        if bound is not None and bound.codec is not None:
            return negotiation.send_section(media, bound.codec, self.outgoing(bound), bound.track.info.stereo)
        if media.mid in self.used_mids or media.kind not in self.free_mids:
            return negotiation.inactive_section(media)
        for sub in self.subs.values():
            if sub.down is not None or sub.kind != media.kind:
                continue
            codec = negotiation.match_subscribe_codec(media, sub.track.codec)
            if codec is None:
                sub.attempts += 1
                continue
            self.used_mids.add(media.mid)
            self._bind(sub, media.mid, codec)
            sub.down.dd_id = dependency_descriptor_id(media, self.allow_mixed)
            return negotiation.send_section(media, codec, self.outgoing(sub), sub.track.info.stereo)
        self.free_mids[media.kind].append(media.mid)
        return negotiation.inactive_section(media)

    def finish_answer(self) -> None:
        self._fail_unbindable()
        self.send_requirement()

    def send_requirement(self) -> None:
        """Ask the client for as many new recvonly m-lines as there are unplaced tracks (0/0 still re-offers)."""
        pending = {"audio": 0, "video": 0}
        for sub in self.subs.values():
            if sub.down is None:
                pending[sub.kind] += 1
        if not any(pending.values()) and not self._has_stale_mids():
            return
        if self.requirement_sent:
            return
        self.requirement_sent = True
        need_audio = max(0, pending["audio"] - len(self.free_mids["audio"]))
        need_video = max(0, pending["video"] - len(self.free_mids["video"]))
        self.p.send(rtc_pb.SignalResponse(
            media_sections_requirement=rtc_pb.MediaSectionsRequirement(num_audios=need_audio, num_videos=need_video)
        ))

    def _has_stale_mids(self) -> bool:
        """A mid answered sendonly whose track is gone must be answered inactive in a new round."""
        return bool(self.p.last_answer_mids - set(self.mid_to_track_id()))

    def _fail_unbindable(self) -> None:
        for sid, sub in list(self.subs.items()):
            if sub.down is None and sub.attempts >= MAX_BIND_ATTEMPTS:
                log.info("%s: cannot receive %s (%s): codec not offered", self.p, sid, sub.track.codec.name)
                del self.subs[sid]
                self.p.send(rtc_pb.SignalResponse(subscription_response=rtc_pb.SubscriptionResponse(
                    track_sid=sid, err=models.SubscriptionError.SE_CODEC_UNSUPPORTED)))

    # --- v0: our offers on the subscriber PC ---------------------------------------------------------------

    async def offer(self) -> None:
        if self.awaiting_answer:
            self.needs_offer = True
            return
        pc = self.p.sub_pc
        if pc is None or self.p.closed or (not self.dirty and self.offer_id):
            return
        self.needs_offer = False
        self.dirty = False
        if not self.app_mid:
            self.app_mid = str(len(self.slots))
        for sub in self.subs.values():
            if sub.down is None:
                # Our own offer names one codec: a RED track goes as plain Opus to a v0 subscriber.
                codec = red.opus_of(sub.track.codec) if red.is_red(sub.track.codec) else sub.track.codec
                slot = Slot(str(len(self.slots) + 1), sub.kind, codec, sub)
                self.slots.append(slot)
                self._bind(sub, slot.mid, codec, bound=False)  # sent once the client answered
        sections = [negotiation.offer_application_section(self.app_mid)]
        for slot in self.slots:
            outgoing = self.outgoing(slot.sub) if slot.sub is not None and slot.sub.down is not None else None
            sections.append(negotiation.offer_track_section(slot.mid, slot.kind, slot.codec, outgoing))
        self.sdp_version += 1
        text = sdp.write(sections, pc.local_transport("actpass"), self.session_id, self.sdp_version, allow_mixed=True)
        self.offer_id += 1
        self.awaiting_answer = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: subscriber offer id=%d\n%s", self.p, self.offer_id, text)
        self.p.send(rtc_pb.SignalResponse(offer=rtc_pb.SessionDescription(
            type="offer", sdp=text, id=self.offer_id, mid_to_track_id=self.mid_to_track_id())))

    async def reoffer(self) -> None:
        """After a resume: a fresh ICE-restart offer of the whole current state. An offer still awaiting its
        answer went to the dead connection (or its answer did), so it is superseded; the new answer binds its
        tracks too."""
        self.awaiting_answer = False
        self.dirty = True
        if self.p.sub_pc is not None:
            self.p.sub_pc.restart_ice()  # new credentials: the client restarts ICE on its subscriber PC
        await self.offer()

    async def on_answer(self, desc: rtc_pb.SessionDescription) -> None:
        if not self.awaiting_answer or self.p.sub_pc is None:
            log.info("%s: unexpected subscriber answer", self.p)
            return
        session = sdp.parse(desc.sdp)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: subscriber answer id=%d\n%s", self.p, desc.id, desc.sdp)
        self.p.sub_pc.set_remote(session, is_offer=False)
        self.awaiting_answer = False
        for sub in self.subs.values():
            if sub.down is not None and not sub.down.bound and sub.offer_id <= self.offer_id:
                answered = session.by_mid(sub.mid)
                if answered is not None:
                    sub.down.dd_id = dependency_descriptor_id(answered, session.allow_mixed)
                sub.down.bind()
        if self.needs_offer:
            await self.offer()

    # --- feedback from the subscriber ----------------------------------------------------------------------

    def on_rtcp(self, packet: rtcp.Packet) -> None:
        if packet.type in (rtcp.RR, rtcp.SR):
            for block in packet.reports:
                down = self.down_by_ssrc.get(block.ssrc)
                if down is not None:
                    down.on_receiver_report(block)
        elif packet.type == rtcp.PSFB:
            if packet.fmt == rtcp.FMT_PLI:
                down = self.down_by_ssrc.get(packet.media_ssrc)
                if down is not None:
                    down.on_keyframe_request()
            elif packet.fmt == rtcp.FMT_FIR:
                for ssrc, _ in packet.fir:
                    down = self.down_by_ssrc.get(ssrc)
                    if down is not None:
                        down.on_keyframe_request()
        elif packet.type == rtcp.RTPFB and packet.fmt == rtcp.FMT_NACK:
            down = self.down_by_ssrc.get(packet.media_ssrc)
            if down is not None:
                down.on_nack(packet.lost)
        elif packet.transport_feedback is not None:
            self.on_transport_feedback(packet.transport_feedback)

    def on_transport_feedback(self, body: bytes) -> None:
        """Transport-wide feedback about what we sent it: update its estimate and fit its streams into it by
        priority. Probes stay judged by receiver reports' round trips and loss: the delay trend of a CPU-starved
        sender or receiver looks like a queue, and failed every probe on a loaded machine."""
        pc = self.p.sub_pc
        sent = pc.twcc if pc is not None else None
        if sent is None:
            return
        now = time.monotonic()
        rtts = [d.rtt for d in self.down_by_ssrc.values() if d.rtt]
        if rtts:
            self.bwe.rtt_ms = max(rtts) * 1000
        now_us = int(now * 1_000_000)
        if not self.bwe.on_transport_feedback(body, sent, now_us):
            return  # malformed
        if self.bwe.measured_for >= WARMUP:
            self.allocator.update(self.bwe.estimate, self.bwe.congested(now_us), list(self.down_by_ssrc.values()),
                                  now)

    def report(self, worker) -> None:
        """Downstream deltas since the previous report, per subscribed track."""
        for sub in self.subs.values():
            d = sub.down
            if d is None:
                continue
            prev = self._reported.get(d.ssrc, (0, 0, 0, 0))
            self._reported[d.ssrc] = (d.packets, d.octets, d.nacks, d.plis)
            worker.on_downstream(sub.track.sid, packets=d.packets - prev[0], bytes=d.octets - prev[1],
                                 nacks=d.nacks - prev[2], plis=d.plis - prev[3], rtt=int(d.rtt * 1000),
                                 layer=d.current.quality if d.current is not None and d.video else -1)

    def tick(self, now: float) -> bytes | None:
        for down in self.down_by_ssrc.values():
            down.tick(now)
        reports = [r for r in (d.sender_report(now) for d in self.down_by_ssrc.values()) if r is not None]
        return b"".join(reports) if reports else None

    def close(self) -> None:
        if self._kick is not None:
            self._kick.cancel()
        for sub in list(self.subs.values()):
            self._release(sub)
        self.subs.clear()
        self.denied.clear()

    def stats(self) -> tuple[int, int]:
        packets = sum(d.packets for d in self.down_by_ssrc.values())
        octets = sum(d.octets for d in self.down_by_ssrc.values())
        return packets, octets


def down_track(up: UpTrack, send: Callable[[bytes], None], track_codec: sdp.Codec, codec: sdp.Codec,
               output=None) -> DownTrack:
    """The down-track for a subscriber that negotiated `codec` for a track published as `track_codec`. Only plain
    forwarding takes the compiled path (`output`); the RED conversions and SVC stay in their Python `write`."""
    if scalable(track_codec):
        return SvcDownTrack(up, send, codec.pt)
    if track_codec.name.upper() == "VP8":
        return Vp8DownTrack(up, send, codec.pt, output=output)
    if not red.is_red(track_codec):
        return DownTrack(up, send, codec.pt, output=output)
    if not red.is_red(codec):
        return UnwrappingDownTrack(up, send, codec.pt)
    theirs, ours = red.inner_pt(codec), red.inner_pt(track_codec)
    if theirs is not None and theirs != ours:
        return RepayloadingDownTrack(up, send, codec.pt, theirs)
    return DownTrack(up, send, codec.pt, output=output)


def dependency_descriptor_id(media: sdp.Media, allow_mixed: bool) -> int:
    """The id a subscriber's m-line gives the dependency descriptor, 0 when absent. Keyframes' descriptors exceed
    the one-byte extension form, so it is only used where two-byte extensions are allowed too."""
    return (media.extmap_id(rtp.EXT_DEPENDENCY_DESCRIPTOR) or 0) if allow_mixed else 0


def quality_for(setting: rtc_pb.UpdateTrackSettings, layers) -> int | None:
    """The highest layer a subscriber wants, from an explicit quality or its rendered size."""
    if setting.width or setting.height:
        best = 0
        for layer in layers:
            if layer.width <= max(setting.width, 1) * 1.1 or layer.height <= max(setting.height, 1) * 1.1:
                best = max(best, QUALITY.get(layer.quality, 0))
        return best
    if setting.quality == models.VideoQuality.OFF:
        return None
    return QUALITY.get(setting.quality, 2)

