"""gRPC plumbing shared by the services: channels by address, deadlines, retries of idempotent calls."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, TypeVar

import grpc
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from braid.rpc import common_pb2, media_pb2_grpc, router_pb2_grpc

if TYPE_CHECKING:
    from braid.shared.config import InternalTLSConfig

T = TypeVar("T")

DEFAULT_DEADLINE = 5.0
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


@dataclass(frozen=True)
class InternalTLS:
    """The cluster CA and this node's certificate: mutual TLS for every internal gRPC server and channel."""

    ca: bytes
    cert: bytes
    key: bytes
    server_name: str

    @classmethod
    def from_config(cls, config: InternalTLSConfig) -> InternalTLS | None:
        if not config.enabled:
            return None

        def read(path: str) -> bytes:
            with open(path, "rb") as fh:
                return fh.read()

        return cls(read(config.ca_file), read(config.cert_file), read(config.key_file), config.server_name)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def add_server_port(server: grpc.aio.Server, address: str, tls: InternalTLS | None) -> int:
    """Listen on `address`: mutual TLS when the cluster has a CA, plaintext otherwise (dev)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


class Channels:
    """One channel per peer address, reused by every call; closed together. Mutual TLS when `tls` is given."""

    def __init__(self, tls: InternalTLS | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tls = tls

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._tls is None:
                channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            else:
                options = [*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", self._tls.server_name)]
                channel = grpc.aio.secure_channel(address, self._tls.channel_credentials(), options=options)
            self._channels[address] = channel
        return channel

    def router(self, address: str) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel(address))

    def media(self, address: str) -> media_pb2_grpc.MediaStub:
        return media_pb2_grpc.MediaStub(self.channel(address))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _RETRYABLE


async def call_idempotent(fn: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
    """Retry a call that is safe to repeat when the peer was unreachable or too slow."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception(_retryable),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.1, max=1.0),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("unreachable")


def rpc_error(code: str, msg: str) -> common_pb2.RpcError:
    return common_pb2.RpcError(code=code, msg=msg)
