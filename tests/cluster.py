"""A real Braid cluster for tests: a router, signal nodes and media nodes as separate processes on one private
redis-server, each role started the way an operator would (`--role`, `--region`, env configuration)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .servers import RedisProcess, ServerProcess, free_port, start_server

KEY, SECRET = "clusterkey", "a-cluster-secret-that-is-long-enough"
REGIONS = {"eu-west": (53.35, -6.26), "us-east": (38.9, -77.0), "ap-south": (19.07, 72.87)}
PORT_BLOCK = 200


@dataclass
class Node:
    name: str
    role: str
    region: str
    server: ServerProcess
    grpc_port: int = 0

    @property
    def pid(self) -> int:
        return self.server.proc.pid

    def metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(self.server.http_url + "/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition(" ")
                out[name] = float(value)
        return out

    def participants(self) -> int:
        return int(self.metrics().get("braid_media_participants", 0))

    def kill(self) -> None:
        """kill -9: no drain, no deregistration, sockets reset by the kernel."""
        os.kill(self.pid, signal.SIGKILL)
        self.server.proc.wait()


@dataclass
class Cluster:
    redis: RedisProcess
    router: Node
    signals: list[Node] = field(default_factory=list)
    media: list[Node] = field(default_factory=list)
    spare_routers: list[Node] = field(default_factory=list)  # no edge uses them; their reapers still run

    def signal(self, region: str) -> Node:
        return next(n for n in self.signals if n.region == region)

    def media_hosting(self) -> dict[str, int]:
        return {n.name: n.participants() for n in self.media if n.server.alive()}

    def registry(self) -> dict[str, dict]:
        """The media nodes' registry entries, read straight from Redis."""
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=2)
        try:
            out = {}
            for key in r.keys("braid:node:*"):
                raw = r.get(key)
                if raw:
                    node = json.loads(raw)
                    if node["role"] == "media":
                        out[node["node_id"]] = node
            return out
        finally:
            r.close()

    def logs(self) -> str:
        parts = []
        for node in [self.router, *self.spare_routers, *self.signals, *self.media]:
            parts.append(f"===== {node.name} =====\n{node.server.log()[-6000:]}")
        return "\n".join(parts)


def throwaway_ca(tmp: Path, name: str = "cluster", server_name: str = "braid.internal") -> dict[str, str]:
    """A CA and one certificate it signed (DNS SAN `server_name`, client and server use), as PEM files in `tmp`;
    returns the environment that runs a node over mutual TLS with them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    window = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def build(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(window[0]).not_valid_after(window[1])
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = (builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = build(f"{name} CA", ca_key, f"{name} CA", ca_key, ca=True)
    node_cert = build(f"{name} node", node_key, f"{name} CA", ca_key, ca=False)
    files = {
        "CA_FILE": (tmp / f"{name}-ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
        "CERT_FILE": (tmp / f"{name}-node.pem", node_cert.public_bytes(serialization.Encoding.PEM)),
        "KEY_FILE": (tmp / f"{name}-node.key", node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    }
    env = {}
    for field_name, (path, data) in files.items():
        path.write_bytes(data)
        env[f"BRAID_INTERNAL_TLS__{field_name}"] = str(path)
    return env


def _regions_yaml(tmp: Path) -> Path:
    path = tmp / "regions.yaml"
    path.write_text("router:\n  node_selector: region_aware\n  regions:\n" + "".join(
        f"    - {{name: {name}, lat: {lat}, lon: {lon}}}\n" for name, (lat, lon) in REGIONS.items()))
    return path


def _wait_ready(nodes: list[Node], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        for node in list(pending):
            if not node.server.alive():
                raise RuntimeError(f"{node.name} exited:\n{node.server.log()}")
            try:
                with urllib.request.urlopen(node.server.http_url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        pending.remove(node)
            except OSError:
                pass
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"not ready: {[n.name for n in pending]}\n" + "\n".join(n.server.log() for n in pending))


def start_cluster(tmp: Path, redis: RedisProcess, *, signal_regions=("eu-west", "us-east"),
                  media_regions=("eu-west", "us-east"), env: dict[str, str] | None = None,
                  media_env: dict[str, str] | None = None, port_base: int = 51000, routers: int = 1) -> Cluster:
    """Start every process at once (they find each other through Redis and the router) and wait for all."""
    common = {"BRAID_KEYS": f"{KEY}: {SECRET}", "BRAID_REDIS__ADDRESS": redis.address, "BRAID_LOG_LEVEL": "INFO",
              **(env or {})}
    config = str(_regions_yaml(tmp))
    router_grpc = free_port()
    router = Node("router", "router", "", start_server(
        tmp, "--config", config, "--role", "router", "--grpc-port", str(router_grpc), env=common, dev=False,
        wait_ready=False), router_grpc)
    cluster = Cluster(redis, router)
    for i in range(1, routers):
        cluster.spare_routers.append(Node(f"router-{i + 1}", "router", "", start_server(
            tmp, "--config", config, "--role", "router", env=common, dev=False, wait_ready=False)))
    for i, region in enumerate(media_regions):
        start = port_base + i * PORT_BLOCK
        node_env = {**common, **(media_env or {}), "BRAID_RTC__PORT_RANGE_START": str(start),
                    "BRAID_RTC__PORT_RANGE_END": str(start + PORT_BLOCK - 1), "BRAID_NODE_ID": f"ND_media{i + 1}"}
        cluster.media.append(Node(f"media-{i + 1}", "media", region, start_server(
            tmp, "--config", config, "--role", "media", "--region", region, env=node_env, dev=False,
            wait_ready=False)))
    for i, region in enumerate(signal_regions):
        cluster.signals.append(Node(f"signal-{i + 1}", "signal", region, start_server(
            tmp, "--config", config, "--role", "signal", "--region", region,
            "--router-address", f"127.0.0.1:{router_grpc}", env=common, dev=False, wait_ready=False)))
    try:
        _wait_ready([router, *cluster.spare_routers, *cluster.media, *cluster.signals])
    except Exception:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    for node in [*cluster.signals, *cluster.media, cluster.router, *cluster.spare_routers]:
        node.server.stop(timeout=5)


async def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll a (blocking or cheap) predicate off the event loop's critical path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(interval)
    return bool(await asyncio.to_thread(predicate))
