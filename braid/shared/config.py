"""Configuration: defaults, a YAML file, then environment variables, validated with the field named.

The dev default (`--dev`) is one process on 127.0.0.1:7880 with the key pair devkey/secret and no Redis.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

ROLES = ("signal", "media", "router")
DEV_KEYS = {"devkey": "secret"}


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending field."""


@dataclass
class RedisConfig:
    address: str = ""  # host:port; empty means the embedded in-memory store and bus
    username: str = ""
    password: str = ""
    db: int = 0
    use_tls: bool = False
    sentinel_master_name: str = ""
    sentinel_addresses: list[str] = field(default_factory=list)
    sentinel_username: str = ""
    sentinel_password: str = ""
    key_prefix: str = "braid"

    @property
    def enabled(self) -> bool:
        return bool(self.address or self.sentinel_addresses)


@dataclass
class RTCConfig:
    node_ip: str = "127.0.0.1"  # the IP put in server ICE candidates
    bind_ip: str = ""  # the IP media sockets listen on; empty: node_ip (set it when node_ip is a 1:1 NAT's or a relay's)
    udp_port: int = 7882  # the one UDP port of every participant's ICE/DTLS/SRTP; 0: a port each from the range
    tcp_port: int = 7881  # ICE over TCP (passive candidates) for clients without UDP; 0: off
    node_ip6: str = ""  # an IPv6 address to announce as well; "auto": the host's first global IPv6 address
    port_range_start: int = 50000
    port_range_end: int = 60000
    enable_v1: bool = True  # `/rtc/v1` single-PeerConnection path; off → 404, SDKs fall back to v0
    stun_servers: list[str] = field(default_factory=list)
    use_node_external_ip: bool = False  # in Kubernetes: announce the node's ExternalIP (see braid/shared/kube.py)
    ping_interval: int = 5  # seconds; told to clients in the JoinResponse
    ping_timeout: int = 15  # a participant whose signal and media are both silent this long is removed
    connect_timeout: float = 20.0  # a participant whose transports never connect is removed after this long
    websocket_heartbeat: float = 10.0  # the edge pings each WebSocket; no pong in half of it closes it
    fast_path: bool = True  # the compiled SRTP/sendmmsg send path when built; off: the pure-Python path
    udp_gso: bool = True  # compiled path: a destination's run of equal-sized datagrams as one segmented message


@dataclass
class TurnConfig:
    """TURN servers handed to clients in the JoinResponse and ReconnectResponse `ice_servers`.

    `urls` (turn:host:3478?transport=udp, turn:host:3478?transport=tcp, turns:host:5349) get either time-limited
    credentials minted per participant under `secret` (coturn's `use-auth-secret` / `static-auth-secret`), or,
    without a secret, the static `username` / `credential`. `servers` lists more TURN servers, each passed through
    as configured: {urls: [...], username: ..., credential: ...}.
    """

    urls: list[str] = field(default_factory=list)
    username: str = ""
    credential: str = ""
    secret: str = ""
    ttl: int = 86400  # seconds the minted credentials stay valid (coturn also checks them on allocation refresh)
    servers: list[dict] = field(default_factory=list)


@dataclass
class RoomConfig:
    auto_create: bool = True
    empty_timeout: int = 300  # seconds a room waits for its first participant
    departure_timeout: int = 20  # seconds a room lingers after its last participant left
    max_participants: int = 0  # 0: unlimited


@dataclass
class WebhookConfig:
    urls: list[str] = field(default_factory=list)
    api_key: str = ""  # key that signs webhooks; defaults to the first configured key
    timeout: float = 5.0
    max_attempts: int = 5  # dev mode's in-memory queue; the cluster's outbox retries for as long as it retains
    # The cluster's durable outbox (Redis): how long and how many events per room it keeps for a receiver that is
    # down, and the longest wait between two attempts.
    retention: float = 24 * 3600.0
    max_events: int = 10_000
    retry_max_interval: float = 30.0


@dataclass
class InternalTLSConfig:
    """Mutual TLS on the gRPC between the roles, with a cluster CA: all three files set turns it on (every role
    then serves and dials only TLS and requires the peer's certificate from that CA); none set is plaintext, as
    the dev server runs. Every role's certificate names `server_name` (a DNS SAN): pods' IPs need not be in it."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = "braid.internal"

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)


@dataclass
class RouterConfig:
    node_selector: str = "least_load"  # any | least_load | region_aware | power_of_two
    # Coordinates for region-aware placement: [{name: eu-west, lat: 53.3, lon: -6.3}, ...]
    regions: list[dict] = field(default_factory=list)
    heartbeat_ttl: float = 10.0  # a node missing heartbeats this long is gone


@dataclass
class LimitsConfig:
    """What a node and each client may hold. 0 disables a limit.

    The node's own (`max_participants`, `max_tracks`, `max_bytes_per_second`): the router places nothing on a node
    that reached one, and the node itself refuses joins past them (the edge then places the participant elsewhere). The rest bound what one client controls,
    with LiveKit's figures where it has them (metadata, attributes, name); each refusal is counted in `/metrics`
    as `braid_limit_<name>_refused_total`.
    """

    max_participants: int = 0
    max_tracks: int = 0
    max_bytes_per_second: float = 0.0
    max_tracks_per_participant: int = 32  # published and pending (add_track not yet bound to an m-line)
    max_layers_per_track: int = 4  # SSRCs of one published track (simulcast layers; RTX rides with its layer)
    max_candidates_per_transport: int = 64  # trickled remote ICE candidates
    max_subscriptions: int = 1000  # tracks one participant receives
    max_participant_name_length: int = 256
    max_metadata_size: int = 64000
    max_attributes_size: int = 64000  # keys and values of all attributes together
    max_data_packet_size: int = 256 * 1024
    max_data_bytes_per_second: int = 2 * 1024 * 1024  # what one participant may publish on its data channels
    max_signal_queue: int = 1000  # messages queued toward a client that does not read them: then it is dropped
    max_data_buffered: int = 8 * 1024 * 1024  # reliable data buffered toward one slow subscriber: then dropped


@dataclass
class TelemetryConfig:
    stats_interval: float = 30.0
    worker_reap_delay: float = 180.0
    analytics_path: str = ""  # JSON-lines stream of stats and events; empty disables it
    otel_exporter: str = ""  # "", "console" or "otlp"
    otlp_endpoint: str = ""


@dataclass
class MediaConfig:
    """How a media process uses its machine (role media)."""

    # Media worker processes, each its own media node (own node id, HTTP/gRPC ports and slice of the UDP range);
    # rooms span them through the relay. 0: one per CPU this process may use (its cgroup quota or affinity).
    workers: int = 1


@dataclass
class Config:
    keys: dict[str, str] = field(default_factory=dict)
    bind: str = "127.0.0.1"
    port: int = 7880
    role: str = "all"  # "all" runs signal, router and media in one process
    dev: bool = False
    region: str = ""
    zone: str = ""
    node_id: str = ""
    grpc_bind: str = "127.0.0.1"
    grpc_port: int = 0  # 0: a free port
    router_address: str = ""  # gRPC address of a router (cluster roles)
    refresh_token_interval: float = 300.0
    drain_deadline: float = 300.0  # seconds a draining node has to move its participants before it exits
    log_level: str = "INFO"
    redis: RedisConfig = field(default_factory=RedisConfig)
    rtc: RTCConfig = field(default_factory=RTCConfig)
    turn: TurnConfig = field(default_factory=TurnConfig)
    room: RoomConfig = field(default_factory=RoomConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    internal_tls: InternalTLSConfig = field(default_factory=InternalTLSConfig)
    media: MediaConfig = field(default_factory=MediaConfig)

    def is_set(self, path: str) -> bool:
        """Whether `path` (e.g. "rtc.udp_port") was given by the file, the environment or a flag."""
        return path in getattr(self, "_given", ())

    @property
    def webhook_key(self) -> tuple[str, str] | None:
        if not self.keys:
            return None
        key = self.webhook.api_key or next(iter(self.keys))
        return key, self.keys[key]

    def validate(self) -> "Config":
        if not self.keys:
            raise ConfigError("keys: at least one API key/secret pair is required (or use --dev)")
        for key, secret in self.keys.items():
            if not key or not secret:
                raise ConfigError("keys: API keys and secrets must be non-empty")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} is not between 1 and 65535")
        if not 0 <= self.grpc_port < 65536:
            raise ConfigError(f"grpc_port: {self.grpc_port} is not between 0 and 65535")
        if self.role != "all" and self.role not in ROLES:
            raise ConfigError(f"role: {self.role!r} is not one of all, signal, media, router")
        if self.role == "signal" and not self.router_address:
            raise ConfigError(f"router_address: required for role {self.role}")
        if self.role != "all" and not self.redis.enabled:
            raise ConfigError(f"redis.address: a {self.role} node of a cluster needs Redis")
        for name in ("udp_port", "tcp_port"):
            if not 0 <= getattr(self.rtc, name) < 65536:
                raise ConfigError(f"rtc.{name}: {getattr(self.rtc, name)} is not between 0 and 65535")
        if self.rtc.node_ip6 not in ("", "auto"):
            try:
                ipaddress.IPv6Address(self.rtc.node_ip6)
            except ValueError:
                raise ConfigError(f"rtc.node_ip6: {self.rtc.node_ip6!r} is not an IPv6 address or auto") from None
        if not 0 < self.rtc.port_range_start <= self.rtc.port_range_end < 65536:
            raise ConfigError("rtc.port_range_start/rtc.port_range_end: need 0 < start <= end < 65536")
        if self.webhook.api_key and self.webhook.api_key not in self.keys:
            raise ConfigError(f"webhook.api_key: {self.webhook.api_key!r} is not a configured key")
        for name in ("retention", "max_events", "retry_max_interval", "timeout"):
            if getattr(self.webhook, name) <= 0:
                raise ConfigError(f"webhook.{name}: must be positive")
        for url in self.webhook.urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"webhook.urls: {url!r} is not an http(s) URL")
        for name in ("empty_timeout", "departure_timeout", "max_participants"):
            if getattr(self.room, name) < 0:
                raise ConfigError(f"room.{name}: must not be negative")
        for limit in dataclasses.fields(self.limits):
            if getattr(self.limits, limit.name) < 0:
                raise ConfigError(f"limits.{limit.name}: must not be negative")
        for name in ("ping_interval", "ping_timeout", "connect_timeout"):
            if getattr(self.rtc, name) <= 0:
                raise ConfigError(f"rtc.{name}: must be positive")
        if self.rtc.websocket_heartbeat < 0:
            raise ConfigError("rtc.websocket_heartbeat: must not be negative")
        tls = self.internal_tls
        if tls.enabled:
            for name in ("ca_file", "cert_file", "key_file"):
                path = getattr(tls, name)
                if not path:
                    raise ConfigError(f"internal_tls.{name}: required with the other internal_tls files")
                if not os.path.isfile(path):
                    raise ConfigError(f"internal_tls.{name}: {path} is not a readable file")
            if not tls.server_name:
                raise ConfigError("internal_tls.server_name: must not be empty")
        if self.media.workers < 0:
            raise ConfigError("media.workers: must be 0 (one per CPU) or more")
        if self.drain_deadline < 0:
            raise ConfigError("drain_deadline: must not be negative")
        _check_ice_urls("turn.urls", self.turn.urls)
        if self.turn.ttl <= 0:
            raise ConfigError("turn.ttl: must be positive")
        if self.turn.secret and not self.turn.urls:
            raise ConfigError("turn.secret: set turn.urls too (the TURN servers that share the secret)")
        for i, server in enumerate(self.turn.servers):
            urls = server.get("urls") if isinstance(server, Mapping) else None
            if not urls or set(server) - {"urls", "username", "credential"}:
                raise ConfigError(f"turn.servers[{i}]: needs urls, and optionally username and credential")
            _check_ice_urls(f"turn.servers[{i}].urls", [urls] if isinstance(urls, str) else urls)
        if self.telemetry.stats_interval <= 0:
            raise ConfigError("telemetry.stats_interval: must be positive")
        if self.router.node_selector not in ("any", "least_load", "region_aware", "power_of_two"):
            raise ConfigError(
                f"router.node_selector: {self.router.node_selector!r} is not one of "
                "any, least_load, region_aware, power_of_two"
            )
        for i, region in enumerate(self.router.regions):
            if not isinstance(region, Mapping) or not region.get("name"):
                raise ConfigError(f"router.regions[{i}]: needs name, lat and lon")
            try:
                float(region["lat"]), float(region["lon"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"router.regions[{i}]: lat and lon must be numbers") from None
        if self.telemetry.otel_exporter not in ("", "console", "otlp"):
            raise ConfigError("telemetry.otel_exporter: must be empty, console or otlp")
        return self


def _check_ice_urls(where: str, urls: list) -> None:
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("turn:", "turns:", "stun:")):
            raise ConfigError(f"{where}: {url!r} is not a turn:, turns: or stun: URL")


def parse_keys(text: str) -> dict[str, str]:
    """`"key1: secret1\\nkey2: secret2"` (or comma-separated), as LIVEKIT_KEYS is written."""
    keys: dict[str, str] = {}
    for entry in text.replace(",", "\n").splitlines():
        if not entry.strip():
            continue
        key, sep, secret = entry.partition(":")
        if not sep or not key.strip() or not secret.strip():
            raise ConfigError(f"keys: entry {entry.strip()!r} is not 'key: secret'")
        keys[key.strip()] = secret.strip()
    return keys


def _apply(target: Any, values: Mapping[str, Any], path: str = "", given: set[str] | None = None) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path.rstrip('.') or 'config'}: must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(target)}
    for name, value in values.items():
        where = f"{path}{name}"
        if name not in fields:
            raise ConfigError(f"{where}: unknown field")
        current = getattr(target, name)
        if given is not None:
            given.add(where)
        if dataclasses.is_dataclass(current):
            _apply(current, value or {}, where + ".", given)
        elif name == "keys" and not path:
            if isinstance(value, str):
                value = parse_keys(value)
            if not isinstance(value, Mapping):
                raise ConfigError("keys: must be a mapping of API key to secret")
            setattr(target, name, {str(k): str(v) for k, v in value.items()})
        else:
            setattr(target, name, _coerce(where, current, value))


def _coerce(where: str, current: Any, value: Any) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("1", "true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if isinstance(current, int):
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError(value)
            return [dict(v) if isinstance(v, Mapping) else str(v) for v in value]
        if isinstance(current, str):
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: invalid value {value!r} (expected {type(current).__name__})") from None
    return value


# Environment variables that override the file: BRAID_<FIELD>, nested with a double underscore
# (BRAID_REDIS__ADDRESS); BRAID_KEYS takes "key: secret" lines. LIVEKIT_KEYS is honoured too.
ENV_PREFIX = "BRAID_"


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if "LIVEKIT_KEYS" in env:
        overrides["keys"] = env["LIVEKIT_KEYS"]
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        node = overrides
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return overrides


def load_config(
    path: str | None = None,
    *,
    dev: bool = False,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then the YAML file, then environment variables, then explicit overrides (CLI flags)."""
    config = Config()
    config._given = given = set()  # type: ignore[attr-defined]
    if dev:
        config.dev = True
        config.keys = dict(DEV_KEYS)
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"config file: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file: {path} is not valid YAML: {exc}") from None
        _apply(config, data, given=given)
    _apply(config, _env_overrides(os.environ if env is None else env), given=given)
    if overrides:
        _apply(config, {k: v for k, v in overrides.items() if v is not None}, given=given)
    return config.validate()
