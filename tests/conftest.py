"""Shared fixtures: one dev server per session (with a webhook receiver), and a factory for custom ones."""

from __future__ import annotations

import uuid

import pytest

from .impairment import RELAY_IP, UdpImpairmentRelay, behind_relay_env, can_isolate, free_port_block
from .servers import RedisProcess, ServerProcess, WebhookSink, start_redis, start_server, start_webhook_sink


@pytest.fixture(scope="session")
def webhook_sink() -> WebhookSink:
    sink = start_webhook_sink()
    yield sink
    sink.server.shutdown()


@pytest.fixture(scope="session")
def dev_server(tmp_path_factory, webhook_sink) -> ServerProcess:
    """`braid-server --dev` as a real process, sending webhooks to `webhook_sink`."""
    server = start_server(
        tmp_path_factory.mktemp("dev-server"),
        env={"BRAID_WEBHOOK__URLS": webhook_sink.url},
    )
    yield server
    server.stop()


@pytest.fixture
def server_factory(tmp_path):
    """Start extra servers with their own flags/env; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, dev: bool = True, wait_ready: bool = True) -> ServerProcess:
        server = start_server(tmp_path, *args, env=env, dev=dev, wait_ready=wait_ready)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def room_name() -> str:
    return "room-" + uuid.uuid4().hex[:10]


@pytest.fixture
def redis_server(tmp_path) -> RedisProcess:
    """A private redis-server for one test; the test may stop and restart it."""
    redis = start_redis(tmp_path)
    yield redis
    redis.stop()


@pytest.fixture
async def impaired_server_factory(server_factory):
    """Dev servers whose media ports are reached only through a UDP impairment relay (tests/impairment.py):
    `await start(env)` → (server, relay)."""
    if not can_isolate():
        pytest.skip("the impairment relay needs root and iptables to keep the media node behind it")
    relays: list[UdpImpairmentRelay] = []

    async def start(env: dict[str, str] | None = None):
        ports = free_port_block(12)
        server = server_factory(env={**behind_relay_env(ports), **(env or {})})
        relay = await UdpImpairmentRelay(RELAY_IP, "127.0.0.1", ports).start()
        relays.append(relay)
        return server, relay

    yield start
    for relay in relays:
        relay.close()
