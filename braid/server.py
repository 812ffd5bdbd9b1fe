"""`braid-server`: runs the signal, router and media services, all in one process (`--dev`) or one role each."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal as os_signal
import sys
import time

import grpc
from aiohttp import web

from braid import __version__
from braid.backends import Backends, make_backends
from braid.shared import ids
from braid.shared.auth import KeyProvider
from braid.shared.config import Config, ConfigError, load_config
from braid.shared.health import Refusals, add_drain_routes, add_metrics_route, health_app
from braid.shared.tracing import setup_tracing, shutdown_tracing
from braid.shared.rpc import Channels, InternalTLS, add_server_port, server_options
from braid.shared.webhooks import notifier_from_config

log = logging.getLogger("braid")

BACKEND_CHECK_INTERVAL = 0.5
BACKEND_PING_TIMEOUT = 2.0  # a stalled Redis (a refused connection fails at once)
RECHECK_INTERVAL = 0.2
RECHECK_TIMEOUT = 0.5


class Server:
    """Owns every long-lived part of a node and starts/stops them in order."""

    def __init__(self, config: Config):
        self.config = config
        self.node_id = config.node_id or ids.node_id()
        self.roles = {"signal", "router", "media"} if config.role == "all" else {config.role}
        self.backends: Backends = make_backends(config)
        self.tls = InternalTLS.from_config(config.internal_tls)
        self.channels = Channels(self.tls)
        self.signal_refusals = Refusals()
        self.notifier = notifier_from_config(config, redis=self.backends.redis, lease=self.backends.store.try_lease,
                                             owner=self.node_id)
        self.grpc_server: grpc.aio.Server | None = None
        self.grpc_address = ""
        self.http_runner: web.AppRunner | None = None
        self.http_port = 0
        self.media = None
        self.reaper = None
        self.dispatcher = None
        self.agent_hub = None
        self.router_presence = None
        self.routers = None  # the signal edge's view of the registered routers
        self._started = False
        self._draining = False
        self._backend_ok = True
        self._rechecked_at = 0.0
        self._health_task: asyncio.Task | None = None

    async def store_up_now(self) -> bool:
        """Whether Redis answers. While the last check said no, asks again (at most every RECHECK_INTERVAL; the
        others are refused at once): polled only, a join right after Redis came back was refused for up to a
        check interval after the media nodes had seen it back."""
        if self._backend_ok:
            return True
        now = time.monotonic()
        if now - self._rechecked_at < RECHECK_INTERVAL:
            return False
        self._rechecked_at = now
        self._backend_ok = await self.backends.healthy(timeout=RECHECK_TIMEOUT)
        return self._backend_ok

    def ready(self) -> bool:
        serving = self.media is None or self.media.state == "SERVING"
        return self._started and not self._draining and self._backend_ok and serving

    async def start(self) -> None:
        setup_tracing(
            self.config.telemetry.otel_exporter, self.config.telemetry.otlp_endpoint,
            service_name=f"braid-{self.config.role}", node_id=self.node_id,
        )
        await self.notifier.start()
        self.grpc_server = grpc.aio.server(options=server_options())
        port = add_server_port(self.grpc_server, f"{self.config.grpc_bind}:{self.config.grpc_port}", self.tls)
        self.grpc_address = f"{self.config.grpc_bind}:{port}"
        if self.tls is None and self.config.role != "all":
            log.warning("internal gRPC on %s is plaintext: whoever reaches it can call it; set internal_tls.ca_file,"
                        " cert_file and key_file (a cluster CA) on every role", self.grpc_address)
        if self.config.role == "all":
            self.config.router_address = self.grpc_address
        if "router" in self.roles:
            self._add_router()
        if "media" in self.roles:
            self._add_media()
        await self.grpc_server.start()
        if self.media is not None:
            await self.media.start()
        if self.reaper is not None:
            self.reaper.start()
        if self.dispatcher is not None:
            await self.dispatcher.start()
        if self.router_presence is not None:
            self.router_presence.start()
        await self._start_http()
        if self.agent_hub is not None:
            await self.agent_hub.start()
        if self.routers is not None:
            self.routers.start()
        self._health_task = asyncio.create_task(self._watch_backends(), name="backend-health")
        self._started = True

    def _add_router(self) -> None:
        from braid.rpc import router_pb2_grpc
        from braid.services.router.lifecycle import RoomReaper
        from braid.services.router.placement import NodeSelector, Region
        from braid.services.router.presence import RouterPresence
        from braid.services.router.rooms import RoomDirectory
        from braid.services.router.service import RouterService

        from braid.services.router.agents import AgentDispatcher

        directory = RoomDirectory(self.backends.store, self.config.room, self.notifier)
        self.dispatcher = AgentDispatcher(self.backends.agents, self.backends.store, self.backends.bus, self.node_id)
        directory.listeners.append(self.dispatcher)
        regions = [Region(r["name"], float(r["lat"]), float(r["lon"])) for r in self.config.router.regions]
        service = RouterService(
            directory,
            self.backends.registry,
            self.channels,
            NodeSelector(self.config.router.node_selector, regions),
            auto_create=self.config.room.auto_create,
            dispatcher=self.dispatcher,
            store_up=self.store_up_now,
        )
        router_pb2_grpc.add_RouterServicer_to_server(service, self.grpc_server)
        self.reaper = RoomReaper(directory, registry=self.backends.registry, owner=self.node_id)
        # One registry entry per role: a process that is also a media node registers that under its node id.
        presence_id = self.node_id if "media" not in self.roles else f"{self.node_id}-router"
        self.router_presence = RouterPresence(self.backends.registry, presence_id, self.grpc_address,
                                              self.config.region)

    def _add_media(self) -> None:
        from braid.rpc import media_pb2_grpc
        from braid.services.media.node import MediaNode

        self.media = MediaNode(
            config=self.config,
            store=self.backends.store,
            bus=self.backends.bus,
            registry=self.backends.registry,
            notifier=self.notifier,
            node_id=self.node_id,
            grpc_address=self.grpc_address,
        )
        media_pb2_grpc.add_MediaServicer_to_server(self.media.servicer, self.grpc_server)
        from braid.rpc import cluster_pb2_grpc

        cluster_pb2_grpc.add_RelayServicer_to_server(self.media.cluster.servicer, self.grpc_server)

    def _http_app(self) -> web.Application:
        """The signal edge serves clients; the other roles serve only their health probes."""
        if "signal" not in self.roles:
            app = health_app(self.ready)
            if self.media is not None:
                add_drain_routes(app, self.media.drain, KeyProvider(self.config.keys))
            return app
        from braid.services.signal.agents import AgentHub
        from braid.services.signal.app import create_app
        from braid.services.signal.context import SignalContext
        from braid.services.signal.failover import Routers

        keys = KeyProvider(self.config.keys)
        self.routers = Routers(self.backends.registry, self.channels, self.config.router_address)
        ctx = SignalContext(
            config=self.config,
            keys=keys,
            channels=self.channels,
            node_id=self.node_id,
            ready=self.ready,
            routers=self.routers,
            refusals=self.signal_refusals,
        )
        self.agent_hub = AgentHub(self.backends.agents, self.backends.bus, keys, self.node_id, self.config.region)
        return create_app(ctx, self.agent_hub)

    def metrics(self) -> dict[str, float]:
        gauges = {"braid_up": 1.0, "braid_ready": float(self.ready())}
        if self.media is not None:
            info = self.media.node_info()
            gauges["braid_media_participants"] = info.participants
            gauges["braid_media_tracks"] = info.tracks
            gauges["braid_media_rooms"] = len(self.media.rooms)
            gauges.update(self.media.refusals.metrics())
            gauges.update(self.media.cluster.metrics())
        gauges.update(self.signal_refusals.metrics())
        hooks = self.notifier.stats()
        if hooks:
            gauges["braid_webhook_sent_total"] = sum(s.sent for s in hooks)
            gauges["braid_webhook_failed_total"] = sum(s.failed for s in hooks)
            gauges["braid_webhook_dropped_total"] = self.notifier.num_dropped
            gauges["braid_webhook_queued"] = max(s.queued for s in hooks)
        return gauges

    async def _start_http(self) -> None:
        app = self._http_app()
        add_metrics_route(app, self.metrics)
        self.http_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.http_runner.setup()
        site = web.TCPSite(self.http_runner, self.config.bind, self.config.port, reuse_address=True)
        await site.start()
        self.http_port = self.config.port

    async def _watch_backends(self) -> None:
        """Whether Redis answers, kept current so joins and placements are refused at once while it does not."""
        while True:
            self._backend_ok = await self.backends.healthy(timeout=BACKEND_PING_TIMEOUT)
            await asyncio.sleep(BACKEND_CHECK_INTERVAL)

    async def stop(self) -> None:
        self._draining = True
        if self._health_task:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self.agent_hub is not None:
            await self.agent_hub.stop()
        if self.router_presence is not None:
            await self.router_presence.stop()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.routers is not None:
            await self.routers.stop()
        if self.reaper is not None:
            await self.reaper.stop()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.media is not None:
            await self.media.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        await self.channels.close()
        await self.notifier.stop(timeout=2.0)
        await self.backends.close()
        shutdown_tracing()

    def describe(self) -> str:
        host = self.config.bind
        parts = [f"Braid {__version__} node {self.node_id} roles={','.join(sorted(self.roles))}"]
        if "signal" in self.roles:
            parts.append(f"connect to ws://{host}:{self.http_port} (HTTP API http://{host}:{self.http_port})")
        else:
            parts.append(f"health on http://{host}:{self.http_port}/healthz")
        parts.append(f"gRPC on {self.grpc_address}{' (mutual TLS)' if self.tls else ''}")
        if self.config.dev:
            key, secret = next(iter(self.config.keys.items()))
            parts.append(f"dev mode: API key {key!r}, secret {secret!r}")
        return "; ".join(parts)


async def serve(config: Config) -> None:
    if config.role in ("media", "all"):
        from braid.shared.kube import apply_discovery, discover

        config = apply_discovery(config, await discover(config))
    server = Server(config)
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (os_signal.SIGINT, os_signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        await server.start()
        log.info(server.describe())
        signalled = asyncio.create_task(signals.get())
        waiting = {signalled}
        if server.media is not None:
            waiting.add(asyncio.create_task(server.media.drain.done.wait()))  # a drain started by an admin call
        finished, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if signalled in finished and signalled.result() == os_signal.SIGTERM and server.config.role == "media":
            await drain_until_done_or_signalled(server, signals)
        log.info("shutting down")
    finally:
        await server.stop()


async def drain_until_done_or_signalled(server: Server, signals: asyncio.Queue) -> None:
    """SIGTERM on a media node: move its participants elsewhere within the drain deadline; a second
    signal exits at once."""
    drain = server.media.drain
    await drain.start()
    done = asyncio.create_task(drain.done.wait())
    again = asyncio.create_task(signals.get())
    finished, _ = await asyncio.wait({done, again}, return_when=asyncio.FIRST_COMPLETED)
    for task in (done, again):
        task.cancel()
    if again in finished:
        log.warning("second signal during drain: exiting now")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="braid-server", description="Braid real-time media server")
    parser.add_argument("--dev", action="store_true", help="one process, in-memory state, key devkey/secret")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--role", choices=["all", "signal", "media", "router"], help="run one service")
    parser.add_argument("--bind", help="address for HTTP/WebSocket (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port for HTTP/WebSocket (default 7880)")
    parser.add_argument("--grpc-port", type=int, help="port for internal gRPC (default: a free one)")
    parser.add_argument("--node-ip", help="IP announced in ICE candidates")
    parser.add_argument("--region", help="region of this node")
    parser.add_argument("--redis", help="Redis host:port (cluster mode)")
    parser.add_argument("--router-address", help="gRPC address of a router (signal and media roles)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {
        "role": args.role,
        "bind": args.bind,
        "port": args.port,
        "grpc_port": args.grpc_port,
        "region": args.region,
        "router_address": args.router_address,
        "log_level": args.log_level,
    }
    if args.node_ip:
        overrides["rtc"] = {"node_ip": args.node_ip}
    if args.redis:
        overrides["redis"] = {"address": args.redis}
    try:
        config = load_config(args.config, dev=args.dev, overrides=overrides)
    except ConfigError as exc:
        print(f"braid-server: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if config.role == "media":
        from braid.workers import run_workers, worker_count

        workers = worker_count(config)
        if workers > 1:
            raise SystemExit(run_workers(config, workers))
    runner = asyncio.run
    if os.environ.get("BRAID_NO_UVLOOP") != "1":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    try:
        runner(serve(config))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
