"""Kubernetes discovery against a local server that answers like the API server for `GET /api/v1/nodes/<name>`."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from kubernetes import client as kube_client

from braid.shared import kube
from braid.shared.config import Config
from braid.shared.kube import Discovery, apply_discovery, discover, discovery_from_node

from .servers import free_port

TOKEN = "fake-service-account-token"


def node_object(name: str, *, region: str = "eu-west-3", zone: str = "eu-west-3b", external: bool = True) -> dict:
    addresses = [
        {"type": "Hostname", "address": name},
        {"type": "InternalIP", "address": "fd00::12"},
        {"type": "InternalIP", "address": "10.0.3.12"},
    ]
    if external:
        addresses += [{"type": "ExternalIP", "address": "2001:db8::7"}, {"type": "ExternalIP", "address": "198.51.100.7"}]
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                kube.REGION_LABEL: region,
                kube.ZONE_LABEL: zone,
                "node.kubernetes.io/instance-type": "c6i.2xlarge",
            },
        },
        "spec": {"podCIDR": "10.244.3.0/24"},
        "status": {"addresses": addresses, "conditions": [{"type": "Ready", "status": "True"}]},
    }


@dataclass
class FakeApiServer:
    url: str = ""
    nodes: dict[str, dict] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Authorization header)
    status: int = 200
    delay: bool = False
    garbage: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def read_node(request: web.Request) -> web.Response:
            self.requests.append((request.path, request.headers.get("Authorization", "")))
            if self.delay:
                await self.release.wait()
            if self.garbage:  # a proxy in the way answering HTML
                return web.Response(text="<html>bad gateway</html>", content_type="text/html")
            if self.status != 200:
                return web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": self.status,
                     "message": "nodes is forbidden" if self.status == 403 else "failure"},
                    status=self.status,
                )
            node = self.nodes.get(request.match_info["name"])
            if node is None:
                return web.json_response({"kind": "Status", "status": "Failure", "code": 404}, status=404)
            return web.json_response(node)

        app = web.Application()
        app.router.add_get("/api/v1/nodes/{name}", read_node)
        return app


async def start(server: FakeApiServer, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    server.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    return runner


@pytest.fixture
async def api_server():
    server = FakeApiServer(nodes={"node-a": node_object("node-a")})
    runner = await start(server)
    yield server
    server.release.set()
    await runner.cleanup()


def client_config(server: FakeApiServer) -> kube_client.Configuration:
    configuration = kube_client.Configuration()
    configuration.host = server.url
    configuration.api_key = {"BearerToken": TOKEN}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return configuration


def media_config(*, use_node_external_ip: bool = True) -> Config:
    config = Config(role="media")
    config.zone = ""  # the field the lead adds; set here so the test does not depend on when
    config.rtc.use_node_external_ip = use_node_external_ip
    return config


async def test_learns_region_zone_and_external_ip(api_server):
    found = await discover(media_config(), env={"NODE_NAME": "node-a"}, client_configuration=client_config(api_server))
    assert api_server.requests == [("/api/v1/nodes/node-a", f"Bearer {TOKEN}")]
    assert found == Discovery(
        region="eu-west-3", zone="eu-west-3b", external_ip="198.51.100.7", internal_ip="10.0.3.12",
        node_name="node-a", source="kubernetes",
    )
    applied = apply_discovery(media_config(), found)
    assert (applied.region, applied.zone, applied.rtc.node_ip) == ("eu-west-3", "eu-west-3b", "198.51.100.7")


async def test_external_ip_only_when_asked_and_internal_ip_as_fallback(api_server):
    api_server.nodes["node-b"] = node_object("node-b", external=False)
    found = await discover(media_config(), env={"NODE_NAME": "node-b"}, client_configuration=client_config(api_server))
    assert found.external_ip == "" and found.internal_ip == "10.0.3.12"
    assert apply_discovery(media_config(), found).rtc.node_ip == "10.0.3.12"
    # Without rtc.use_node_external_ip the announced IP is left alone; region and zone are still learned.
    untouched = apply_discovery(media_config(use_node_external_ip=False), found)
    assert untouched.rtc.node_ip == Config().rtc.node_ip
    assert (untouched.region, untouched.zone) == ("eu-west-3", "eu-west-3b")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_in_cluster_service_account_over_tls(tmp_path):
    """The real in-cluster path: service host/port env, the mounted token and CA, TLS verified against that CA."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    cert_path, key_path = self_signed_cert(account)
    (account / "token").write_text(TOKEN)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    server = FakeApiServer(nodes={"node-tls": node_object("node-tls", region="us-east-1", zone="us-east-1a")})
    runner = await start(server, context)
    try:
        port = server.url.rsplit(":", 1)[1]
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port, "NODE_NAME": "node-tls"}
        assert kube.in_cluster(env, account)
        found = await discover(media_config(), env=env, service_account_dir=account)
    finally:
        await runner.cleanup()
    assert server.requests == [("/api/v1/nodes/node-tls", f"bearer {TOKEN}")]
    assert (found.region, found.zone, found.external_ip, found.source) == (
        "us-east-1", "us-east-1a", "198.51.100.7", "kubernetes",
    )


async def test_configured_values_win(api_server):
    configured = media_config()
    configured.region, configured.zone, configured.rtc.node_ip = "eu-central", "eu-central-1a", "203.0.113.9"
    found = await discover(configured, env={"NODE_NAME": "node-a"}, client_configuration=client_config(api_server))
    assert api_server.requests == [], "nothing left to learn: the API server is not asked"
    assert found.empty and found.node_name == "node-a"

    # Region configured, zone and IP not: the node is read, but the configured region stays.
    partial = media_config()
    partial.region = "eu-central"
    found = await discover(partial, env={"NODE_NAME": "node-a"}, client_configuration=client_config(api_server))
    assert len(api_server.requests) == 1
    applied = apply_discovery(partial, found)
    assert (applied.region, applied.zone, applied.rtc.node_ip) == ("eu-central", "eu-west-3b", "198.51.100.7")
    assert partial.zone == "" and partial.rtc.node_ip == Config().rtc.node_ip, "apply_discovery is pure"

    # Every configured value beats the node's, whatever discovery found.
    kept = apply_discovery(configured, discovery_from_node(node_object("node-a")))
    assert (kept.region, kept.zone, kept.rtc.node_ip) == ("eu-central", "eu-central-1a", "203.0.113.9")


async def test_outside_kubernetes_nothing_is_called(api_server, tmp_path, monkeypatch):
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    (account / "ca.crt").write_text("not used")
    calls: list[object] = []
    monkeypatch.setattr(kube_client, "CoreV1Api", lambda *a, **k: calls.append(a) or pytest.fail("API called"))
    monkeypatch.setattr(kube_client, "ApiClient", lambda *a, **k: calls.append(a) or pytest.fail("client built"))
    port = api_server.url.rsplit(":", 1)[1]

    # No in-cluster environment (a developer machine, CI): even with a token file and NODE_NAME around.
    for env in ({}, {"NODE_NAME": "node-a"}, {"KUBERNETES_SERVICE_PORT": port, "NODE_NAME": "node-a"}):
        found = await discover(media_config(), env=env, service_account_dir=account)
        assert found == Discovery()
    # In-cluster environment but no service-account token mounted (automountServiceAccountToken: false).
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port, "NODE_NAME": "node-a"}
    assert await discover(media_config(), env=env, service_account_dir=tmp_path / "absent") == Discovery()
    assert calls == [] and api_server.requests == []
    # The default arguments read the real process environment and the real token path; this machine has neither.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert await discover(media_config()) == Discovery()
    assert apply_discovery(media_config(), Discovery()) == media_config()


async def test_missing_node_name_is_logged_not_fatal(api_server, caplog):
    caplog.set_level(logging.WARNING, logger="braid.shared.kube")
    found = await discover(media_config(), env={}, client_configuration=client_config(api_server))
    assert found == Discovery() and api_server.requests == []
    assert "NODE_NAME" in caplog.text


@pytest.mark.parametrize(
    "failure,expect_in_log",
    [
        ("forbidden", "HTTP 403"),
        ("unknown-node", "HTTP 404"),
        ("server-error", "HTTP 500"),
        ("not-json", "JSONDecodeError"),
        ("timeout", "node-a"),
        ("refused", "node-a"),
    ],
)
async def test_api_server_failures_leave_discovery_empty(api_server, caplog, failure, expect_in_log):
    caplog.set_level(logging.WARNING, logger="braid.shared.kube")
    node_name = "node-a"
    configuration = client_config(api_server)
    if failure == "forbidden":
        api_server.status = 403
    elif failure == "unknown-node":
        node_name = "node-gone"
    elif failure == "server-error":
        api_server.status = 500
    elif failure == "not-json":
        api_server.garbage = True
    elif failure == "timeout":
        api_server.delay = True
    elif failure == "refused":
        configuration.host = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    found = await discover(media_config(), env={"NODE_NAME": node_name}, client_configuration=configuration,
                           timeout=0.5)
    elapsed = time.monotonic() - started
    assert found.empty and found.node_name == node_name
    assert elapsed < 3.0
    assert "kubernetes discovery" in caplog.text and expect_in_log in caplog.text
    assert apply_discovery(media_config(), found) == media_config()


def test_node_object_parsing():
    found = discovery_from_node({"metadata": {"name": "bare"}, "status": {}})
    assert found == Discovery(node_name="bare", source="kubernetes")
    assert not found.empty
    ipv6_only = node_object("v6")
    ipv6_only["status"]["addresses"] = [{"type": "ExternalIP", "address": "2001:db8::9"},
                                        {"type": "ExternalIP", "address": "not-an-ip"}]
    assert discovery_from_node(ipv6_only).external_ip == "2001:db8::9"
