"""One PeerConnection of a participant, built from aiortc's transport objects (ICE, DTLS-SRTP, SCTP).

The media node writes and reads SDP itself (`sdp.py`, `negotiation.py`); this class only runs the transports
and moves packets. aiortc seams (aiortc 1.16.0, pinned by `tests/test_media_seams.py`):
* `RTCIceGatherer._connection` is replaced by a `NodeIceConnection` before the `RTCIceTransport` is built;
* `RTCDtlsTransport._rx_srtp` / `_tx_srtp` (pylibsrtp sessions) are used directly: decrypt in the ICE
  protocol's fast lane, encrypt and `sendto` on the nominated pair's socket;
* `RTCDtlsTransport._handle_rtp_data` / `_handle_rtcp_data` are replaced on the instance, so the few packets that
  arrive through aiortc's own receive loop (before the fast lane is armed) reach the same handlers raw.
No RTCRtpReceiver/RTCRtpSender exists: aiortc never parses, buffers or decodes a media packet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import pylibsrtp
from aioice.candidate import Candidate
from aiortc.rtcdatachannel import RTCDataChannel, RTCDataChannelParameters
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsFingerprint, RTCDtlsParameters, RTCDtlsTransport
from aiortc.rtcicetransport import RTCIceGatherer, RTCIceParameters, RTCIceTransport
from aiortc.rtcsctptransport import RTCSctpCapabilities, RTCSctpTransport

from . import sdp, twcc
from .fastpath import CompiledSendPath, SrtpError
from .ice import IceHost

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 20.0
DEFAULT_SCTP_MESSAGE_SIZE = 65536


class TransportError(Exception):
    pass


class PeerTransport:
    """ICE + DTLS-SRTP (+ SCTP) for one PeerConnection. Callbacks run on the event loop and must not block."""

    def __init__(
        self,
        *,
        ice: IceHost,
        certificate: RTCCertificate,
        offerer: bool,
        label: str,
        on_rtp: Callable[[bytes], None],
        on_rtcp: Callable[[bytes], None],
        on_state: Callable[[str], None],
        on_datachannel: Callable[[RTCDataChannel], None] | None = None,
        send_path: CompiledSendPath | None = None,
    ):
        self.label = label
        self.offerer = offerer
        self.on_rtp = on_rtp
        self.on_rtcp = on_rtcp
        self.on_state = on_state
        self.on_datachannel = on_datachannel
        self.state = "new"
        self.connected_at = 0.0
        self.created_at = time.monotonic()
        self.packets_in = 0
        self.bytes_in = 0
        self._packets_out = self._bytes_out = 0
        self.errors = 0

        self.ice_conn = ice.connection(controlling=offerer)
        gatherer = RTCIceGatherer(iceServers=[])
        gatherer._connection = self.ice_conn
        self.ice = RTCIceTransport(gatherer)
        self.dtls = RTCDtlsTransport(self.ice, [certificate])
        self.dtls._handle_rtp_data = self._tap_rtp  # type: ignore[method-assign]
        self.dtls._handle_rtcp_data = self._tap_rtcp  # type: ignore[method-assign]
        self.sctp: RTCSctpTransport | None = None
        self._certificate = certificate
        self._remote_ufrag = ""
        self._remote_pwd = ""
        self._remote_fingerprints: list[tuple[str, str]] = []
        self._remote_ice_lite = False
        self._dtls_role = "client"
        self._sctp_port = 0
        self._sctp_max_message = DEFAULT_SCTP_MESSAGE_SIZE
        self._connect_task: asyncio.Task | None = None
        self._rx: pylibsrtp.Session | None = None
        self._tx: pylibsrtp.Session | None = None
        self._send_path = send_path
        self._srtp_sender = None
        self._unprotect_rtp: Callable[[bytes], bytes] | None = None  # the one decrypt per received packet
        # The compiled path's Output (fastpath): down-tracks hold it from the start; it is bound to keys and a
        # destination on the first packet sent, `_out_pair`, and None when this connection stays on pylibsrtp.
        self.output = send_path.output() if send_path is not None else None
        self._out_pair = None
        self.twcc: twcc.SentPackets | None = None  # the transport-wide numbers of what we send, once negotiated
        self.ice_conn.on_pair_change = self._pair_changed
        self._closed = False
        self._tasks: set[asyncio.Future] = set()
        self.ice.on("statechange", self._ice_state)
        self.dtls.on("statechange", self._dtls_state)

    # --- local description ---------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Bind the socket (one host candidate) before the first local description is written."""
        await self.ice.iceGatherer.gather()
        if not self.ice_conn.local_candidates:
            raise TransportError("no local candidate")

    def local_transport(self, setup: str) -> sdp.Transport:
        fingerprints = [(f.algorithm, f.value) for f in self._certificate.getFingerprints()]
        return sdp.Transport(
            ice_ufrag=self.ice_conn.local_username,
            ice_pwd=self.ice_conn.local_password,
            fingerprints=fingerprints,
            setup=setup,
            candidates=[c.to_sdp() for c in self.ice_conn.local_candidates],
        )

    @property
    def answer_setup(self) -> str:
        return "active" if self._dtls_role == "client" else "passive"

    # --- remote description --------------------------------------------------------------------------------

    def set_remote(self, session: sdp.Session, is_offer: bool) -> None:
        """Apply the transport part of a remote description; starts connecting on the first one."""
        first = next((m for m in session.media if not m.rejected), None)
        if first is None:
            raise TransportError("every m-line is rejected")
        self._negotiate_twcc(session)
        if self._remote_ufrag:
            if first.ice_ufrag and first.ice_ufrag != self._remote_ufrag:
                # The peer restarted ICE (a resume): same socket, DTLS and SCTP, its new credentials (see ice.py).
                log.info("%s: ICE restart by the peer", self.label)
                self._remote_ufrag, self._remote_pwd = first.ice_ufrag, first.ice_pwd
                self.ice_conn.restart_remote(first.ice_ufrag, first.ice_pwd)
                for media in session.media:
                    for cand in media.candidates:
                        self._add_candidate_text(cand)
            self._maybe_start_sctp(session)
            return
        self._remote_ufrag, self._remote_pwd = first.ice_ufrag, first.ice_pwd
        self._remote_fingerprints = first.fingerprints
        self._remote_ice_lite = session.ice_lite
        if is_offer:
            # We answer `active` (DTLS client) unless the offerer insists on being active itself.
            self._dtls_role = "server" if first.setup == "active" else "client"
        else:
            self._dtls_role = "client" if first.setup == "passive" else "server"
        for media in session.media:
            for cand in media.candidates:
                self._add_candidate_text(cand)
        self._maybe_start_sctp(session)
        self._connect_task = asyncio.create_task(self._connect(), name=f"connect-{self.label}")

    def _negotiate_twcc(self, session: sdp.Session) -> None:
        """Number what we send transport-wide once both sides have the extension (a remote offer has it, and our
        answer keeps it; a remote answer kept it from our offer); the numbering goes on through renegotiations."""
        ext_id = next((i for m in session.media if m.kind in ("audio", "video") and not m.rejected
                       for i, uri in m.extmaps.items() if uri == twcc.EXT_TRANSPORT_CC), 0)
        if not 0 < ext_id < 15 or (self.twcc is not None and self.twcc.ext_id == ext_id):
            return
        self.twcc = twcc.SentPackets(ext_id)
        if self.output is not None:
            self.output.set_twcc(ext_id, self.twcc.ring)

    def restart_ice(self) -> None:
        """New local ICE credentials for our next offer (an ICE restart); the socket, DTLS and SCTP stay."""
        if self.state == "connected":
            self.ice_conn.restart_local()

    def _maybe_start_sctp(self, session: sdp.Session) -> None:
        app = next((m for m in session.media if m.kind == "application" and not m.rejected), None)
        if app is None or self._sctp_port:
            return
        self._sctp_port = app.sctp_port or 5000
        self._sctp_max_message = app.max_message_size or DEFAULT_SCTP_MESSAGE_SIZE
        if self.sctp is None:
            self._new_sctp()
        self.sctp.mid = app.mid
        if self.dtls.state == "connected":
            self._own(asyncio.ensure_future(self._start_sctp()))

    def _new_sctp(self) -> RTCSctpTransport:
        self.sctp = RTCSctpTransport(self.dtls)
        if self.on_datachannel is not None:
            self.sctp.on("datachannel", self.on_datachannel)
        return self.sctp

    def create_data_channel(self, label: str, ordered: bool = True, max_retransmits: int | None = None):
        if self.sctp is None:
            self._new_sctp()
        return RTCDataChannel(
            self.sctp, RTCDataChannelParameters(label=label, ordered=ordered, maxRetransmits=max_retransmits)
        )

    async def add_candidate(self, candidate: str | None) -> None:
        """A trickled remote candidate (`candidate:…` or the bare value); None or "" ends the candidates."""
        if not candidate:
            await self.ice_conn.add_remote_candidate(None)
            return
        self._add_candidate_text(candidate)

    def _add_candidate_text(self, text: str) -> None:
        if text.startswith("candidate:"):
            text = text[len("candidate:"):]
        try:
            candidate = Candidate.from_sdp(text)
        except (ValueError, IndexError):
            log.debug("%s: ignoring unparsable candidate %r", self.label, text[:80])
            return
        if candidate.transport.lower() != "udp":
            return  # the node's TCP candidates are passive: the peer's active ones connect to them
        self._own(asyncio.ensure_future(self.ice_conn.add_remote_candidate(candidate)))

    def _own(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # --- connecting ----------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        self._set_state("connecting")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self.ice.start(
                    RTCIceParameters(
                        usernameFragment=self._remote_ufrag, password=self._remote_pwd, iceLite=self._remote_ice_lite
                    )
                )
                if self.ice.state != "completed":
                    raise TransportError(f"ICE {self.ice.state}")
                self.dtls._set_role(self._dtls_role)
                await self.dtls.start(
                    RTCDtlsParameters(fingerprints=[RTCDtlsFingerprint(a, v) for a, v in self._remote_fingerprints])
                )
                if self.dtls.state != "connected":
                    raise TransportError(f"DTLS {self.dtls.state}")
        except (TimeoutError, TransportError, ConnectionError, OSError) as exc:
            log.info("%s: transport failed: %s", self.label, exc or type(exc).__name__)
            self._set_state("failed")
            return
        self._rx, self._tx = self.dtls._rx_srtp, self.dtls._tx_srtp
        receiver = self._send_path.srtp_receiver(self.dtls) if self._send_path is not None else None
        self._unprotect_rtp = receiver.unprotect if receiver is not None else self._rx.unprotect
        self.ice_conn.set_fast(self._on_srtp)
        self.connected_at = time.monotonic()
        pair = self.ice_conn._nominated.get(1)
        if pair is not None:
            log.info("%s: connected over %s %s:%s", self.label, pair.local_candidate.transport.upper(),
                     *pair.remote_addr)
        self._set_state("connected")
        if self.sctp is not None:
            await self._start_sctp()

    async def _start_sctp(self) -> None:
        if self.sctp is not None and self._sctp_port:
            await self.sctp.start(RTCSctpCapabilities(maxMessageSize=self._sctp_max_message), self._sctp_port)

    def _ice_state(self) -> None:
        if self.ice.state in ("failed", "closed") and self.state == "connected":
            self._set_state("failed")

    def _dtls_state(self) -> None:
        if self.dtls.state in ("failed", "closed") and self.state == "connected":
            # DTLS closed while ICE still holds: the peer sent close_notify (it hung up on purpose).
            peer_closed = self.dtls.state == "closed" and self.ice.state == "completed" and not self._closed
            self._set_state("hangup" if peer_closed else "failed")

    def _set_state(self, state: str) -> None:
        if self.state == state or self.state == "closed":
            return
        self.state = state
        try:
            self.on_state(state)
        except Exception:
            log.exception("%s: state callback failed", self.label)

    @property
    def last_rx(self) -> float:
        return max(self.ice_conn.last_rx, self.connected_at)

    # --- packets -------------------------------------------------------------------------------------------

    def _on_srtp(self, data: bytes) -> None:
        try:
            if 192 <= data[1] <= 223:
                plain = self._rx.unprotect_rtcp(data)  # type: ignore[union-attr]
                self.on_rtcp(plain)
            else:
                plain = self._unprotect_rtp(data)
                self.packets_in += 1
                self.bytes_in += len(plain)
                self.on_rtp(plain)
        except (pylibsrtp.Error, *SrtpError):
            self.errors += 1
        except Exception:
            self.errors += 1
            log.exception("%s: packet handler failed", self.label)

    async def _tap_rtp(self, data: bytes, arrival_time_ms: int = 0) -> None:
        try:
            self.packets_in += 1
            self.on_rtp(data)
        except Exception:
            log.exception("%s: packet handler failed", self.label)

    async def _tap_rtcp(self, data: bytes) -> None:
        try:
            self.on_rtcp(data)
        except Exception:
            log.exception("%s: RTCP handler failed", self.label)

    def send_rtp(self, packet: bytes) -> None:
        pair = self.ice_conn._nominated.get(1)
        if pair is None:
            return
        if pair is self._out_pair or self._bind_output(pair):
            try:
                self.output.send(packet)  # type: ignore[union-attr]
            except SrtpError:
                self.errors += 1
            return
        tx = self._tx
        if tx is None:
            return
        if self.twcc is not None:
            packet = self.twcc.stamp(packet, time.monotonic_ns() // 1000)
        try:
            data = tx.protect(packet)
        except pylibsrtp.Error:
            self.errors += 1
            return
        pair.protocol.transport.sendto(data, pair.remote_addr)
        self._packets_out += 1
        self._bytes_out += len(data)

    def _bind_output(self, pair) -> bool:
        """Point the compiled path's Output at `pair` (first packet, or the pair changed after an ICE restart);
        False when RTP stays on the pylibsrtp session. Once one of them protected a packet, RTP never moves to
        the other: their rollover counters would part."""
        out = self.output
        if out is None or self._tx is None:
            return False
        if self._srtp_sender is None:
            if self._packets_out:
                return False  # already sending through pylibsrtp: stay there
            self._srtp_sender = self._send_path.srtp_sender(self.dtls)  # type: ignore[union-attr]
        if self._srtp_sender is None or not self._send_path.bind(  # type: ignore[union-attr]
                out, self._srtp_sender, pair.protocol.transport, pair.remote_addr):
            out.unbind()
            self.output = self._out_pair = None  # this profile or socket stays on the pure-Python path
            return False
        self._out_pair = pair
        return True

    def _pair_changed(self) -> None:
        """ICE moved media to another pair: the compiled fan-out stops until the next send binds the new one."""
        if self.output is not None:
            self.output.unbind()
        self._out_pair = None

    @property
    def packets_out(self) -> int:
        return self._packets_out + (self.output.packets if self.output is not None else 0)

    @property
    def bytes_out(self) -> int:
        return self._bytes_out + (self.output.bytes if self.output is not None else 0)

    def send_rtcp(self, packet: bytes) -> None:
        tx = self._tx
        pair = self.ice_conn._nominated.get(1)
        if tx is None or pair is None:
            return
        try:
            data = tx.protect_rtcp(packet)
        except pylibsrtp.Error:
            self.errors += 1
            return
        pair.protocol.transport.sendto(data, pair.remote_addr)

    # --- teardown ------------------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._set_state("closed")
        self.ice_conn.set_fast(None)
        self._tx = None
        if self.output is not None:
            self.output.unbind()
        self._out_pair = None
        pending = [t for t in (self._connect_task, *self._tasks) if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for step in (self._stop_sctp, self.dtls.stop, self.ice.stop):
            try:
                await asyncio.wait_for(step(), 2.0)
            except Exception as exc:  # closing must always finish
                log.debug("%s: close step failed: %r", self.label, exc)

    async def _stop_sctp(self) -> None:
        if self.sctp is not None:
            await self.sctp.stop()


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("background transport step failed: %r", task.exception())
