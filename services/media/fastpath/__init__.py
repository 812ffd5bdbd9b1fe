"""The send path of the forwarding loop, chosen once when the media node starts.

* Compiled (`_fastpath.c`, built by `pip install` when a C compiler and OpenSSL's headers are there): SRTP protect
  in C with the DTLS-SRTP keys of each PeerConnection, queued into one `Batch` per event loop and handed to the
  kernel with one `sendmmsg` per socket at the end of the wake-up that produced them.
* Pure Python (the reference, and the fallback when the extension is missing or `rtc.fast_path` is off): aiortc's
  pylibsrtp session and one `sendto` per packet, see `PeerTransport.send_rtp`.

Both produce the same bytes for the same keys and packets (tests/test_fastpath.py).
"""

from __future__ import annotations

import asyncio
import logging
import weakref

log = logging.getLogger(__name__)

try:
    from . import _fastpath
except ImportError as exc:  # not built: no compiler or no OpenSSL headers at install time
    _fastpath = None
    UNAVAILABLE = f"the compiled extension is not built ({exc})"
else:
    UNAVAILABLE = ""

SrtpError: tuple[type[Exception], ...] = (_fastpath.Error,) if _fastpath is not None else ()


def _fan_out_python(subs: list, layer, data: bytes, off: int, marker: int, seq: int, ts: int, keyframe: bool,
                    now: float) -> None:
    payload = data[off:]
    b0 = data[0]
    for down in subs:
        down.write(layer, b0, marker, seq, ts, payload, keyframe)


class _PlainDownState:
    """Without the extension, a down-track's per-packet fields are ordinary attributes."""

    output = None
    python_only = False
    last_marker = False


# forward.UpTrack calls `fan_out` once per received packet; downtrack.DownTrack derives from `DownTrackBase`, whose
# compiled form keeps the fields fan_out reads in C. With the extension, subscribers whose transport has a bound
# Output are served in C, the others through DownTrack.write (the reference); without it, all through write.
fan_out = _fastpath.fanout if _fastpath is not None else _fan_out_python
DownTrackBase = _fastpath.DownState if _fastpath is not None else _PlainDownState

# aiortc's OpenSSL profile names -> the extension's profile numbers (pylibsrtp's, too)
_PROFILES = {
    b"SRTP_AES128_CM_SHA1_80": 1,
    b"SRTP_AEAD_AES_128_GCM": 7,
    b"SRTP_AEAD_AES_256_GCM": 8,
}


def endpoint_factory(path: CompiledSendPath | None):
    """How the media node opens its UDP sockets: burst-reading endpoints (endpoint.py), draining with recvmmsg
    on the compiled path and a recvfrom loop on the pure-Python one."""
    from functools import partial

    from .endpoint import create_endpoint

    return partial(create_endpoint, compiled=path is not None)


class CompiledSendPath:
    """Makes one `_fastpath.Output` per PeerConnection; all of them share the batch of the running loop."""

    def __init__(self, gso: bool = True) -> None:
        self.gso = gso
        self.name = "compiled (C SRTP, fan-out, sendmmsg/recvmmsg batching" + (", UDP GSO)" if gso else ")")
        self._batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, object] = weakref.WeakKeyDictionary()

    def batch(self):
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:
            holder: list = []
            call_soon = loop.call_soon
            batch = _fastpath.Batch(1024, lambda: call_soon(holder[0].flush), self.gso)
            holder.append(batch)
            self._batches[loop] = batch
        return batch

    def output(self):
        """An unbound Output on this loop's batch: `bind` gives it keys and a destination."""
        return _fastpath.Output(self.batch())

    @staticmethod
    def bind(output, sender, transport, remote_addr) -> bool:
        """Point `output` at `remote_addr` through `transport`'s socket with `sender`'s keys (one sender per
        connection: its rollover counters must survive a change of pair); False when the socket is not one the
        extension handles."""
        sock = transport.get_extra_info("socket")
        if sock is None or ":" in remote_addr[0]:
            return False
        output.bind(sender, sock.fileno(), remote_addr[0], remote_addr[1])
        return True

    @staticmethod
    def srtp_sender(dtls):
        return srtp_context(dtls, outbound=True)

    @staticmethod
    def srtp_receiver(dtls):
        """The inbound context, for the one decrypt per received packet (None: keep aiortc's session)."""
        return srtp_context(dtls, outbound=False)


def srtp_context(dtls, outbound: bool = True):
    """A compiled SRTP context with the keys of aiortc's `dtls._tx_srtp` (outbound) or `dtls._rx_srtp`, or None
    for a profile the extension lacks (aiortc 1.16.0 seams: `_ssl`, `_role`, `_srtp_profiles`, pinned by
    tests/test_media_seams.py)."""
    ssl = dtls._ssl
    if ssl is None or _fastpath is None:
        return None
    selected = ssl.get_selected_srtp_profile()
    profile = next((p for p in dtls._srtp_profiles if p.openssl_profile == selected), None)
    number = _PROFILES.get(selected)
    if profile is None or number is None:
        return None
    material = ssl.export_keying_material(b"EXTRACTOR-dtls_srtp", 2 * (profile.key_length + profile.salt_length))
    server = dtls._role == "server"
    key = profile.get_key_and_salt(material, 1 if server == outbound else 0)
    return _fastpath.SrtpContext(key, number)


def choose(enabled: bool = True, gso: bool = True) -> CompiledSendPath | None:
    """The send path for this process: the compiled one when built and enabled, else None (pure Python)."""
    if enabled and _fastpath is not None:
        return CompiledSendPath(gso)
    return None


def describe(path: CompiledSendPath | None, enabled: bool = True) -> str:
    if path is not None:
        return path.name
    return "pure Python (" + ("rtc.fast_path is off" if not enabled else UNAVAILABLE) + ")"
