"""A LiveKit protocol client with no codecs, for benchmarks: real signalling (`/rtc/v1`), real ICE/DTLS/SRTP,
synthetic RTP.

It is built from the media node's own transport pieces, so a subscriber costs one SRTP decrypt per packet and a
publisher sends packets at exact rates. That keeps the benchmark machine's CPU for the server under test.
"""

from __future__ import annotations

import asyncio
import base64
import gzip

import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp
from aiortc.rtcdtlstransport import RTCCertificate
from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.services.media import rtcp, rtp, sdp, twcc
from braid.services.media.ice import IceHost, PortRange
from braid.services.media.transport import PeerTransport

OPUS = sdp.Codec(111, "opus", 48000, 2, "minptime=10;useinbandfec=1")
VP8 = sdp.Codec(96, "VP8", 90000, 0, "", ["nack", "nack pli", "ccm fir"])
TRANSPORT_CC_ID = 3
EXTMAPS = {4: rtp.EXT_MID, TRANSPORT_CC_ID: twcc.EXT_TRANSPORT_CC}  # as browsers offer: the node numbers what it sends them


@dataclass
class Counters:
    packets: int = 0
    bytes: int = 0
    first_packet_at: float = 0.0


@dataclass
class RawParticipant:
    url: str  # ws://host:port
    token: str
    ports: PortRange
    certificate: RTCCertificate
    identity: str = ""
    counters: Counters = field(default_factory=Counters)
    joined_at: float = 0.0
    join_seconds: float = 0.0
    first_media_seconds: float = 0.0
    count_only: bool = False
    feedback: bool = True  # report arrivals transport-wide every 100 ms, as browsers do
    transport_cc: bool = True  # offer transport-wide numbering (as browsers do); without it the node sends REMB

    def __post_init__(self) -> None:
        self.pc = PeerTransport(
            ice=IceHost.port_range(self.ports, "127.0.0.1"), certificate=self.certificate, offerer=True,
            label=f"bench/{self.identity}", on_rtp=self._on_rtp, on_rtcp=self._on_rtcp, on_state=lambda s: None,
        )
        self.extmaps = dict(EXTMAPS) if self.transport_cc else {k: v for k, v in EXTMAPS.items() if v == rtp.EXT_MID}
        self.remb: deque[tuple[float, int]] = deque(maxlen=1000)  # (when, bits/s) of each REMB the node sent
        self.sections: list[sdp.Section] = []
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.join: rtc_pb.JoinResponse | None = None
        self._reader: asyncio.Task | None = None
        self._published: dict[str, asyncio.Future] = {}
        self._answered: asyncio.Future | None = None
        self._offer_id = 0
        self._started = 0.0
        self._arrivals = twcc.ArrivalRecorder(random.randint(1, 0xFFFFFFFF))
        self._reporter: asyncio.Task | None = None

    # --- offers ----------------------------------------------------------------------------------------

    def _add_recv(self, kind: str) -> None:
        codec = OPUS if kind == "audio" else VP8
        self.sections.append(sdp.Section(kind=kind, mid=str(len(self.sections)), direction="recvonly",
                                         codecs=[codec], extmaps=dict(self.extmaps)))

    def _offer(self) -> rtc_pb.SessionDescription:
        self._offer_id += 1
        text = sdp.write(self.sections, self.pc.local_transport("actpass"), 1, self._offer_id)
        return rtc_pb.SessionDescription(type="offer", sdp=text, id=self._offer_id)

    # --- joining ---------------------------------------------------------------------------------------

    async def connect(self, receive_audio: int = 1, receive_video: int = 1) -> None:
        self._started = time.monotonic()
        await self.pc.prepare()
        for _ in range(receive_audio):
            self._add_recv("audio")
        for _ in range(receive_video):
            self._add_recv("video")
        if not self.sections:  # an offer needs at least one m-line: a data channel section
            self.sections.append(sdp.Section(kind="application", mid="0", proto="UDP/DTLS/SCTP"))
        join = rtc_pb.JoinRequest(
            client_info=models.ClientInfo(sdk=models.ClientInfo.PYTHON, protocol=16, version="bench"),
            connection_settings=rtc_pb.ConnectionSettings(auto_subscribe=True),
            publisher_offer=self._offer(),
        )
        wrapped = rtc_pb.WrappedJoinRequest(compression=rtc_pb.WrappedJoinRequest.GZIP,
                                            join_request=gzip.compress(join.SerializeToString()))
        param = base64.urlsafe_b64encode(wrapped.SerializeToString()).decode()
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(f"{self.url}/rtc/v1?join_request={param}",
                                                headers={"Authorization": f"Bearer {self.token}"}, heartbeat=None)
        first = rtc_pb.SignalResponse.FromString((await self.ws.receive()).data)
        self.join = first.join
        self.join_seconds = time.monotonic() - self._started
        self._answered = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(), name=f"bench-read-{self.identity}")
        await asyncio.wait_for(self._answered, 10)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            response = rtc_pb.SignalResponse.FromString(msg.data)
            kind = response.WhichOneof("message")
            if kind == "answer":
                self.pc.set_remote(sdp.parse(response.answer.sdp), is_offer=False)
                if self._answered is not None and not self._answered.done():
                    self._answered.set_result(True)
            elif kind == "media_sections_requirement":
                req = response.media_sections_requirement
                for _ in range(req.num_audios):
                    self._add_recv("audio")
                for _ in range(req.num_videos):
                    self._add_recv("video")
                await self.send(rtc_pb.SignalRequest(offer=self._offer()))
            elif kind == "track_published":
                future = self._published.get(response.track_published.cid)
                if future is not None and not future.done():
                    future.set_result(response.track_published.track)
            elif kind == "leave":
                return

    async def send(self, request: rtc_pb.SignalRequest) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(request.SerializeToString())

    def _on_rtp(self, data: bytes) -> None:
        c = self.counters
        if not c.packets:
            c.first_packet_at = time.monotonic()
            self.first_media_seconds = c.first_packet_at - self._started
            if self.count_only:
                self.pc.ice_conn.set_fast(self._count_datagram)
            if self.feedback and self._reporter is None:
                self._reporter = asyncio.create_task(self._report_arrivals(), name=f"bench-twcc-{self.identity}")
        c.packets += 1
        c.bytes += len(data)
        self._record_arrival(data)

    def _on_rtcp(self, data: bytes) -> None:
        for packet in rtcp.parse(data):
            if packet.type == rtcp.PSFB and packet.bitrate:
                self.remb.append((time.monotonic(), packet.bitrate))

    def _count_datagram(self, data: bytes) -> None:
        """Once media flows: count SRTP datagrams without decrypting them, so that hundreds of subscribers in
        one benchmark process stay cheaper than the server they measure (the RTP header, and with it the
        transport-wide number, is not encrypted)."""
        if not 192 <= data[1] <= 223:
            c = self.counters
            c.packets += 1
            c.bytes += len(data)
            self._record_arrival(data)

    def _record_arrival(self, data: bytes) -> None:
        if self.feedback:
            seq = twcc.transport_seq(data, TRANSPORT_CC_ID)
            if seq is not None:
                self._arrivals.on_packet(seq, int.from_bytes(data[8:12], "big"), time.monotonic_ns() // 1000)

    async def _report_arrivals(self) -> None:
        """What a browser's receiver does: transport-wide feedback every 100 ms, so the server's estimator and
        allocator run in the benchmark as they run for real subscribers."""
        while True:
            await asyncio.sleep(0.1)
            for packet in self._arrivals.feedback():
                self.pc.send_rtcp(packet)

    # --- publishing ------------------------------------------------------------------------------------

    async def publish(self, kind: str) -> tuple[str, int]:
        """add_track, then a re-offer with a sendonly m-line; returns (track sid, ssrc)."""
        cid = f"{kind}-{os.urandom(4).hex()}"
        self._published[cid] = asyncio.get_running_loop().create_future()
        track_type = models.TrackType.AUDIO if kind == "audio" else models.TrackType.VIDEO
        source = models.TrackSource.MICROPHONE if kind == "audio" else models.TrackSource.CAMERA
        await self.send(rtc_pb.SignalRequest(add_track=rtc_pb.AddTrackRequest(
            cid=cid, name=cid, type=track_type, source=source, width=640 if kind == "video" else 0,
            height=360 if kind == "video" else 0)))
        info = await asyncio.wait_for(self._published[cid], 10)
        ssrc = random.randint(1, 0xFFFFFFFF)
        codec = OPUS if kind == "audio" else VP8
        self.sections.append(sdp.Section(
            kind=kind, mid=str(len(self.sections)), direction="sendonly", codecs=[codec], extmaps=dict(self.extmaps),
            outgoing=sdp.Outgoing(ssrc, "bench", "stream", cid)))
        self._answered = asyncio.get_running_loop().create_future()
        await self.send(rtc_pb.SignalRequest(offer=self._offer()))
        await asyncio.wait_for(self._answered, 10)
        return info.sid, ssrc

    async def wait_connected(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pc.state != "connected":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.identity}: transport {self.pc.state}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            try:
                await self.send(rtc_pb.SignalRequest(leave=rtc_pb.LeaveRequest(
                    reason=models.DisconnectReason.CLIENT_INITIATED)))
            except Exception:
                pass
            await self.ws.close()
        for task in (self._reader, self._reporter):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.pc.close()
        if self.session is not None:
            await self.session.close()


def about_equal(total: int, count: int) -> list[int]:
    """A frame of `total` bytes split into `count` packets as libwebrtc's packetizer splits one: sizes differ by at
    most a byte, the larger ones last (so a subscriber's packets of one frame are not all of one size)."""
    small, larger = divmod(total, count)
    return [small] * (count - larger) + [small + 1] * larger


class SyntheticSender:
    """Sends Opus-sized audio packets every 20 ms and VP8-shaped video frames (keyframe every 2 s)."""

    def __init__(self, pc: PeerTransport, audio_ssrc: int, video_ssrc: int, fps: float = 30.0,
                 packets_per_frame: int = 4, video_payload: int = 1100, audio_payload: int = 90):
        self.pc = pc
        self.audio_ssrc, self.video_ssrc = audio_ssrc, video_ssrc
        self.fps = fps
        self.packets_per_frame = packets_per_frame
        self.video_payload, self.audio_payload = video_payload, audio_payload
        self.sent = 0
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._audio()), asyncio.create_task(self._video())]

    async def _audio(self) -> None:
        seq, ts = random.randint(0, 0xFFFF), random.randint(0, 0xFFFFFFFF)
        body = os.urandom(self.audio_payload)
        next_at = time.monotonic()
        while True:
            self.pc.send_rtp(rtp.HEADER.pack(0x80, OPUS.pt, seq, ts, self.audio_ssrc) + body)
            self.sent += 1
            seq, ts = (seq + 1) & 0xFFFF, (ts + 960) & 0xFFFFFFFF
            next_at += 0.02
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _video(self) -> None:
        seq, ts = random.randint(0, 0xFFFF), random.randint(0, 0xFFFFFFFF)
        body = os.urandom(self.video_payload)
        frame = 0
        period = 1.0 / self.fps
        next_at = time.monotonic()
        rng = random.Random(self.video_ssrc)
        while True:
            key = frame % int(self.fps * 2) == 0
            sizes = about_equal(self.packets_per_frame * self.video_payload - rng.randint(0, 40 * self.packets_per_frame),
                                self.packets_per_frame)
            for i, size in enumerate(sizes):
                start = i == 0
                descriptor = bytes([0x10 if start else 0x00]) + (bytes([0x00 if key else 0x01]) if start else b"")
                marker = 1 if i == self.packets_per_frame - 1 else 0
                self.pc.send_rtp(rtp.HEADER.pack(0x80, (marker << 7) | VP8.pt, seq, ts, self.video_ssrc)
                                 + descriptor + body[:size - len(descriptor)])
                self.sent += 1
                seq = (seq + 1) & 0xFFFF
            frame += 1
            ts = (ts + int(90000 / self.fps)) & 0xFFFFFFFF
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)





async def start_publisher(url: str, token: str, ports, cert, fps: float, packets_per_frame: int,
                          clients: list[RawParticipant], transport_cc: bool = True) -> SyntheticSender:
    """Join a publisher (appended to `clients`, for cleanup), publish audio + video, start its synthetic media."""
    publisher = RawParticipant(url, token, ports, cert, "publisher", transport_cc=transport_cc)
    clients.append(publisher)
    await publisher.connect(receive_audio=0, receive_video=0)
    await publisher.wait_connected()
    _, audio_ssrc = await publisher.publish("audio")
    _, video_ssrc = await publisher.publish("video")
    sender = SyntheticSender(publisher.pc, audio_ssrc, video_ssrc, fps=fps, packets_per_frame=packets_per_frame)
    sender.start()
    return sender


JOIN_ATTEMPTS = 5


async def join_subscribers(url: str, room: str, n: int, token, ports, cert,
                           clients: list[RawParticipant], wait: float = 15.0,
                           count_only: bool = False, feedback: bool = True) -> list[RawParticipant]:
    """Join `n` subscribers (appended to `clients`) and wait until each has received media, or `wait` passed."""
    subscribers = []
    for i in range(n):
        for attempt in range(JOIN_ATTEMPTS):
            sub = RawParticipant(url, token(room, f"sub-{i}"), ports, cert, f"sub-{i}", count_only=count_only,
                                 feedback=feedback)
            clients.append(sub)
            try:
                await sub.connect()
                break
            except aiohttp.WSServerHandshakeError as exc:
                # 503: the server refused the join for now (a timeout inside it, on a loaded machine): retry
                clients.remove(sub)
                await sub.close()
                if exc.status != 503 or attempt == JOIN_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(1.0 + attempt)
        subscribers.append(sub)
    for sub in subscribers:
        await sub.wait_connected()
    deadline = time.monotonic() + wait
    while any(s.counters.packets == 0 for s in subscribers) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return subscribers
