"""Kubernetes awareness: a media pod learns its region, zone and external IP from the node it runs on.

Inside a cluster (the in-cluster environment `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` plus a mounted
service-account token) the node named by `NODE_NAME` (the downward API's `spec.nodeName`, set by the Helm chart) is
read once from the API server:

- `topology.kubernetes.io/region` and `topology.kubernetes.io/zone` labels → region and zone;
- `status.addresses` → the node's ExternalIP (its InternalIP when it has none), used only when
  `rtc.use_node_external_ip` asks for it.

Configuration always wins: `apply_discovery` fills only fields left empty. Outside Kubernetes nothing is called, and
any failure (no RBAC, API server down, slow) leaves an empty `Discovery` and a log line: start-up never fails here.
The node must be readable by the pod's service account (`get` on `nodes`; the chart's ClusterRole grants it).

The kubernetes client blocks, so the request runs in a worker thread under a short timeout.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from kubernetes.client import Configuration

    from braid.shared.config import Config

log = logging.getLogger(__name__)

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
NODE_NAME_ENV = "NODE_NAME"
SERVICE_HOST_ENV = "KUBERNETES_SERVICE_HOST"
SERVICE_PORT_ENV = "KUBERNETES_SERVICE_PORT"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_TIMEOUT = 3.0

SOURCE_NONE = "none"
SOURCE_KUBERNETES = "kubernetes"


@dataclass(frozen=True)
class Discovery:
    """What the node told us; empty strings for what it did not."""

    region: str = ""
    zone: str = ""
    external_ip: str = ""
    #: the node's InternalIP, announced only when `use_node_external_ip` is on and the node has no ExternalIP
    internal_ip: str = ""
    node_name: str = ""
    #: `"kubernetes"` when the values come from the node object, `"none"` when nothing was learned
    source: str = SOURCE_NONE

    @property
    def empty(self) -> bool:
        return self.source == SOURCE_NONE


def in_cluster(env: Mapping[str, str] | None = None, service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> bool:
    """Whether this process runs in a Kubernetes pod that can talk to the API server."""
    env = os.environ if env is None else env
    return bool(env.get(SERVICE_HOST_ENV) and env.get(SERVICE_PORT_ENV)) and (
        service_account_dir / "token"
    ).is_file()


def _configured_node_ip(config: "Config") -> bool:
    from braid.shared.config import RTCConfig

    return config.rtc.node_ip not in ("", RTCConfig().node_ip)


def _wants(config: "Config") -> bool:
    """Whether the node can still tell us anything that configuration left open."""
    return (
        not config.region
        or (hasattr(config, "zone") and not config.zone)
        or (getattr(config.rtc, "use_node_external_ip", False) and not _configured_node_ip(config))
    )


async def discover(
    config: "Config",
    *,
    env: Mapping[str, str] | None = None,
    client_configuration: "Configuration | None" = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    timeout: float = DEFAULT_TIMEOUT,
) -> Discovery:
    """Read this pod's node from the API server; an empty `Discovery` outside Kubernetes or on any failure.

    `client_configuration` targets an explicit API server (tests, or a kubeconfig loaded by the caller) instead of
    the in-cluster one; the node name still comes from `NODE_NAME` in `env`.
    """
    env = os.environ if env is None else env
    node_name = env.get(NODE_NAME_ENV, "")
    if client_configuration is None:
        if not env.get(SERVICE_HOST_ENV):
            return Discovery()  # not in Kubernetes: nothing is called
        if not in_cluster(env, service_account_dir):
            log.info("kubernetes discovery off: no service-account token mounted; using configuration only")
            return Discovery()
    if not node_name:
        log.warning("kubernetes discovery skipped: %s is not set (the downward API's spec.nodeName)", NODE_NAME_ENV)
        return Discovery()
    if not _wants(config):
        log.debug("kubernetes discovery skipped: region, zone and node IP are configured")
        return Discovery(node_name=node_name)
    try:
        node = await asyncio.wait_for(
            asyncio.to_thread(_read_node, node_name, env, client_configuration, service_account_dir, timeout),
            timeout + 1.0,
        )
    except asyncio.TimeoutError:
        log.warning("kubernetes discovery: node %s not read within %.1fs; using configuration only", node_name, timeout)
        return Discovery(node_name=node_name)
    except Exception as exc:  # noqa: BLE001 - any client, TLS or API error must not stop start-up
        log.warning("kubernetes discovery: cannot read node %s (%s); using configuration only", node_name, _why(exc))
        return Discovery(node_name=node_name)
    found = discovery_from_node(node, node_name)
    log.info(
        "kubernetes discovery: node %s region=%r zone=%r external_ip=%r internal_ip=%r",
        node_name, found.region, found.zone, found.external_ip, found.internal_ip,
    )
    return found


def _why(exc: BaseException) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}".strip()
    return f"{type(exc).__name__}: {exc}"


def _read_node(
    node_name: str,
    env: Mapping[str, str],
    client_configuration: "Configuration | None",
    service_account_dir: Path,
    timeout: float,
) -> dict[str, Any]:
    """Blocking: GET /api/v1/nodes/<name>, one attempt, as a plain dict (the JSON the API server sent)."""
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    if client_configuration is None:
        client_configuration = client.Configuration()
        InClusterConfigLoader(
            token_filename=str(service_account_dir / "token"),
            cert_filename=str(service_account_dir / "ca.crt"),
            environ=dict(env),
        ).load_and_set(client_configuration)
    else:
        client_configuration = copy.copy(client_configuration)
    client_configuration.retries = 0
    with client.ApiClient(client_configuration) as api_client:
        response = client.CoreV1Api(api_client).read_node(
            node_name, _preload_content=False, _request_timeout=(timeout, timeout)
        )
        try:
            node: dict[str, Any] = json.loads(response.data)
        finally:
            response.release_conn()
    return node


def discovery_from_node(node: Mapping[str, Any], node_name: str = "") -> Discovery:
    """Pure: the region, zone and addresses of a node object (the API server's JSON)."""
    metadata = node.get("metadata") or {}
    labels = metadata.get("labels") or {}
    addresses = (node.get("status") or {}).get("addresses") or []
    return Discovery(
        region=str(labels.get(REGION_LABEL, "")),
        zone=str(labels.get(ZONE_LABEL, "")),
        external_ip=_pick_address(addresses, "ExternalIP"),
        internal_ip=_pick_address(addresses, "InternalIP"),
        node_name=str(metadata.get("name") or node_name),
        source=SOURCE_KUBERNETES,
    )


def _pick_address(addresses: list[Mapping[str, Any]], kind: str) -> str:
    """The first IPv4 address of that type, else the first IPv6 one; names (Hostname, DNS) are skipped."""
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for entry in addresses:
        if entry.get("type") != kind:
            continue
        try:
            ips.append(ipaddress.ip_address(str(entry.get("address", ""))))
        except ValueError:
            continue
    ips.sort(key=lambda ip: ip.version)
    return str(ips[0]) if ips else ""


def apply_discovery(config: "Config", found: Discovery) -> "Config":
    """Pure: a copy of `config` with what discovery learned filled into the fields configuration left empty.

    - `region` and `zone` (when the config has a zone field) only when empty;
    - `rtc.node_ip` only when `rtc.use_node_external_ip` is on and `rtc.node_ip` was not configured (still its
      default): the node's ExternalIP, or its InternalIP when it has no external one.
    """
    result = copy.deepcopy(config)
    if found.empty:
        return result
    if not result.region and found.region:
        result.region = found.region
    if hasattr(result, "zone") and not result.zone and found.zone:
        result.zone = found.zone
    if getattr(result.rtc, "use_node_external_ip", False) and not _configured_node_ip(result):
        address = found.external_ip or found.internal_ip
        if address:
            if not found.external_ip:
                log.warning("node %s has no ExternalIP; announcing its InternalIP %s", found.node_name, address)
            result.rtc.node_ip = address
        else:
            log.warning("node %s reports no IP address; rtc.node_ip stays %s", found.node_name, result.rtc.node_ip)
    return result
