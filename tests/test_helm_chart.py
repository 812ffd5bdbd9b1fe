"""The Helm chart in deploy/helm/braid, linted and rendered with real Helm (its Go SDK, from `helm-python-sdk`).

Offline: no cluster and no network. Each test renders the chart's three media variants (the default hostNetwork
Deployment, a hostNetwork DaemonSet, a Deployment with a fixed list of UDP ports) and checks the objects.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from braid.shared.config import Config, load_config

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "braid"
RELEASE, NAMESPACE = "demo", "rtc"
ROLES = ("signal", "router", "media")

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "daemonset-hostnetwork": {"media": {"kind": "DaemonSet", "network": "hostNetwork"}},
    "portlist": {"media": {"network": "portList", "udpPort": 0, "portList": {"start": 40000, "count": 8}}},
}

# Environment variables the chart sets for config fields the server does not have yet (the lead adds them):
# each is checked against braid/shared/config.py as soon as the field exists.
PENDING_FIELDS = {
    "BRAID_DRAIN_DEADLINE": "drain_deadline",
    "BRAID_RTC__USE_NODE_EXTERNAL_IP": "rtc.use_node_external_ip",
    "BRAID_TURN__USERNAME": "turn.username",
    "BRAID_TURN__CREDENTIAL": "turn.credential",
}

SECRETS = {
    "api": "k8s-api-secret-4f9a1c7e2b8d6a0f3e5c9b1d7a2e4c6f",
    "redis": "redis-password-91c2e7d4",
    "sentinel": "sentinel-password-5ab3f0e8",
    "turn_user": "turn-user-77d1",
    "turn_credential": "turn-credential-0c6e9a2f",
}
WITH_SECRETS: dict[str, Any] = {
    "apiKeys": {"keys": {"APIclusterkey": SECRETS["api"]}},
    "redis": {
        "bundled": {"enabled": False},
        "sentinel": {"masterName": "braid", "addresses": ["sentinel-0.sentinel:26379", "sentinel-1.sentinel:26379"]},
        "password": SECRETS["redis"],
        "sentinelPassword": SECRETS["sentinel"],
    },
    "turn": {
        "enabled": True,
        "urls": ["turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:443?transport=tcp"],
        "username": SECRETS["turn_user"],
        "credential": SECRETS["turn_credential"],
    },
    "config": {"webhook": {"urls": ["https://hooks.example.com/braid"]}, "room": {"empty_timeout": 120}},
}


@pytest.fixture(scope="module")
def chart():
    helm.disable_logging()  # `fail` messages are asserted on the exceptions, not printed
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@dataclasses.dataclass
class Rendered:
    files: dict[str, str]
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered; have {[o['metadata']['name'] for o in self.objects]}"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(o["metadata"]["name"] == name for o in self.of_kind(kind))

    def workload(self, role: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] in ("Deployment", "DaemonSet")
                 and o["metadata"]["name"] == f"{RELEASE}-braid-{role}"]
        assert len(found) == 1, role
        return found[0]

    def container(self, role: str) -> dict[str, Any]:
        (container,) = self.workload(role)["spec"]["template"]["spec"]["containers"]
        return container

    def env(self, role: str) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.container(role).get("env", [])}

    def config_file(self) -> dict[str, Any]:
        return yaml.safe_load(self.get("ConfigMap", f"{RELEASE}-braid")["data"]["braid.yaml"])

    def secret_data(self, name: str) -> dict[str, str]:
        secret = self.get("Secret", name)
        return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def render(chart: helm.Chart, *layers: dict[str, Any]) -> Rendered:
    files = chart.render(merge(*layers), name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in files.items():
        if path.endswith(".txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(files, objects)


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request) -> dict[str, Any]:
    return VARIANTS[request.param]


def test_lints_clean_in_strict_mode(variant):
    for values in (variant, merge(variant, WITH_SECRETS)):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


def test_every_role_and_its_services(chart, variant):
    out = render(chart, variant)
    media_kind = variant.get("media", {}).get("kind", "Deployment")
    for role in ROLES:
        workload = out.workload(role)
        assert workload["kind"] == (media_kind if role == "media" else "Deployment")
        pod = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == role
        container = out.container(role)
        assert container["args"][:4] == ["--config", "/etc/braid/braid.yaml", "--role", role]
        assert "--port" in container["args"] and "--grpc-port" in container["args"]
        assert out.has("Service", f"{RELEASE}-braid-{role}")
    signal_service = out.get("Service", f"{RELEASE}-braid-signal")
    assert signal_service["spec"]["ports"][0]["targetPort"] == "http"
    router_service = out.get("Service", f"{RELEASE}-braid-router")
    assert {p["name"]: p["port"] for p in router_service["spec"]["ports"]}["grpc"] == 7881
    config = out.config_file()
    assert config["router_address"] == f"{RELEASE}-braid-router:7881"
    assert config["redis"]["address"] == f"{RELEASE}-braid-redis:6379"  # the bundled Redis by default
    assert out.has("Deployment", f"{RELEASE}-braid-redis") and out.has("Service", f"{RELEASE}-braid-redis")
    assert "kubectl" in out.files["braid/templates/NOTES.txt"]


def test_probes_split_liveness_never_depends_on_redis(chart, variant):
    out = render(chart, variant)
    for role in ROLES:
        container = out.container(role)
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        ports = {p["name"]: p for p in container["ports"]}
        assert ports["http"]["containerPort"] == int(container["args"][container["args"].index("--port") + 1])
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]


def test_pod_disruption_budget_per_role(chart, variant):
    out = render(chart, variant)
    for role in ROLES:
        pdb = out.get("PodDisruptionBudget", f"{RELEASE}-braid-{role}")
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["maxUnavailable"] == 1
        pod_labels = out.workload(role)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    off = render(chart, variant, {"router": {"pdb": {"enabled": False}}})
    assert not off.has("PodDisruptionBudget", f"{RELEASE}-braid-router")


def test_termination_grace_follows_drain_deadline(chart, variant):
    out = render(chart, variant)
    defaults = chart.values
    expected = (defaults["preStop"]["sleepSeconds"] + defaults["drain"]["deadlineSeconds"]
                + defaults["drain"]["graceMarginSeconds"])
    assert expected == 335
    custom = render(chart, variant, {"drain": {"deadlineSeconds": 120, "graceMarginSeconds": 20},
                                     "preStop": {"sleepSeconds": 3}})
    for role in ROLES:
        assert out.workload(role)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == expected
        assert out.env(role)["BRAID_DRAIN_DEADLINE"]["value"] == "300"
        assert custom.workload(role)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 143
        assert custom.env(role)["BRAID_DRAIN_DEADLINE"]["value"] == "120"
        assert custom.container(role)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "3"]
    no_prestop = render(chart, variant, {"preStop": {"sleepSeconds": 0}})
    assert "lifecycle" not in no_prestop.container("media")
    assert no_prestop.workload("media")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 330


def _all_configmap_text(out: Rendered) -> str:
    return "\n".join(str(v) for cm in out.of_kind("ConfigMap") for v in (cm.get("data") or {}).values())


def test_secrets_never_in_a_configmap(chart, variant):
    out = render(chart, variant, WITH_SECRETS)
    text = _all_configmap_text(out)
    for value in SECRETS.values():
        assert value not in text
    keys = out.secret_data(f"{RELEASE}-braid-keys")
    assert keys == {"keys": f"APIclusterkey: {SECRETS['api']}"}
    assert out.secret_data(f"{RELEASE}-braid-redis") == {
        "password": SECRETS["redis"], "sentinel-password": SECRETS["sentinel"]}
    assert out.secret_data(f"{RELEASE}-braid-turn") == {
        "username": SECRETS["turn_user"], "credential": SECRETS["turn_credential"]}
    for role in ROLES:
        env = out.env(role)
        for name in ("BRAID_KEYS", "BRAID_REDIS__PASSWORD", "BRAID_REDIS__SENTINEL_PASSWORD"):
            assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"], (role, name)
        assert ("BRAID_TURN__CREDENTIAL" in env) == (role != "router")
        for entry in env.values():
            assert all(secret not in str(entry.get("value", "")) for secret in SECRETS.values())
    assert out.env("signal")["BRAID_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-braid-keys", "key": "keys"}
    config = out.config_file()
    assert config["redis"]["sentinel_addresses"] == WITH_SECRETS["redis"]["sentinel"]["addresses"]
    assert config["turn"] == {"urls": WITH_SECRETS["turn"]["urls"], "ttl": 86400}
    assert config["webhook"]["urls"] == ["https://hooks.example.com/braid"]

    # Keys generated when none are given: still only in the Secret.
    generated = render(chart, variant)
    (pair,) = generated.secret_data(f"{RELEASE}-braid-keys").values()
    key, _, secret = pair.partition(": ")
    assert key.startswith("API") and len(secret) == 48
    assert secret not in _all_configmap_text(generated)
    annotations = generated.get("Secret", f"{RELEASE}-braid-keys")["metadata"]["annotations"]
    assert annotations["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize(
    "field,message",
    [
        ({"keys": {"APIk": "x" * 40}}, "config.keys: set by the chart; use apiKeys"),
        ({"redis": {"password": "hunter2"}}, "config.redis: set by the chart"),
        ({"turn": {"credential": "hunter2"}}, "config.turn.credential: set by the chart"),
        ({"rtc": {"node_ip": "198.51.100.1"}}, "config.rtc.node_ip: set by the chart; use media.rtc.nodeIP"),
        ({"drain_deadline": 60}, "config.drain_deadline: set by the chart; use drain.deadlineSeconds"),
    ],
)
def test_config_refuses_what_the_chart_manages(chart, field, message):
    with pytest.raises(helm.HelmRenderError, match=message.replace(".", r"\.")):
        render(chart, {"config": field})


@pytest.mark.parametrize(
    "which,values,secret_name,env_keys",
    [
        ("apiKeys", {"apiKeys": {"existingSecret": "ops-braid-keys", "existingSecretKey": "livekit-keys"}},
         "ops-braid-keys", {"BRAID_KEYS": "livekit-keys"}),
        ("redis", {"redis": {"bundled": {"enabled": False}, "address": "redis.db.svc:6379", "password": "ignored",
                             "existingSecret": "ops-redis", "existingSecretPasswordKey": "redis-password",
                             "existingSecretSentinelPasswordKey": "sentinel-password"}},
         "ops-redis", {"BRAID_REDIS__PASSWORD": "redis-password", "BRAID_REDIS__SENTINEL_PASSWORD": "sentinel-password"}),
        ("turn", {"turn": {"enabled": True, "urls": ["turn:t.example.com:3478"], "username": "ignored",
                           "existingSecret": "ops-turn", "existingSecretUsernameKey": "user",
                           "existingSecretCredentialKey": "pass"}},
         "ops-turn", {"BRAID_TURN__USERNAME": "user", "BRAID_TURN__CREDENTIAL": "pass"}),
    ],
)
def test_existing_secret_replaces_the_charts_secret(chart, variant, which, values, secret_name, env_keys):
    own = {"apiKeys": f"{RELEASE}-braid-keys", "redis": f"{RELEASE}-braid-redis", "turn": f"{RELEASE}-braid-turn"}
    out = render(chart, variant, values)
    assert not out.has("Secret", own[which])
    assert not out.has("Secret", secret_name), "the operator's Secret is never rendered by the chart"
    roles = ("signal", "media") if which == "turn" else ROLES
    for role in roles:
        env = out.env(role)
        for name, key in env_keys.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": key}, (role, name)
    assert "ignored" not in _all_configmap_text(out)


def test_media_default_is_a_host_network_deployment(chart):
    out = render(chart)
    media = out.workload("media")
    pod = media["spec"]["template"]["spec"]
    assert media["kind"] == "Deployment" and media["spec"]["replicas"] == 2
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert out.env("media")["BRAID_RTC__NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert not [p for p in out.container("media")["ports"] if p["protocol"] == "UDP"]
    assert out.config_file()["rtc"] == {"port_range_start": 50000, "port_range_end": 60000, "udp_port": 7882,
                                        "tcp_port": 7801}
    assert not out.has("HorizontalPodAutoscaler", f"{RELEASE}-braid-media")
    for role in ("signal", "router"):
        assert "hostNetwork" not in out.workload(role)["spec"]["template"]["spec"]


def test_media_daemonset_variant(chart):
    out = render(chart, VARIANTS["daemonset-hostnetwork"], {"media": {"autoscaling": {"enabled": True}}})
    media = out.workload("media")
    assert media["kind"] == "DaemonSet" and "replicas" not in media["spec"]
    assert media["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    assert media["spec"]["template"]["spec"]["hostNetwork"] is True
    assert not out.of_kind("HorizontalPodAutoscaler"), "a DaemonSet is not autoscaled"


def test_media_port_list_variant(chart):
    out = render(chart, VARIANTS["portlist"])
    pod = out.workload("media")["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod
    udp = [p for p in out.container("media")["ports"] if p["protocol"] == "UDP"]
    assert [p["containerPort"] for p in udp] == list(range(40000, 40008))
    assert all(p["hostPort"] == p["containerPort"] and len(p["name"]) <= 15 for p in udp)
    assert len({p["name"] for p in udp}) == 8
    assert out.config_file()["rtc"] == {"port_range_start": 40000, "port_range_end": 40007, "udp_port": 0,
                                        "tcp_port": 7801}
    assert out.env("media")["BRAID_RTC__NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert "podAntiAffinity" in pod["affinity"]

    behind_lb = render(chart, VARIANTS["portlist"], {"media": {
        "portList": {"hostPort": False, "service": {"enabled": True}}, "rtc": {"nodeIP": "203.0.113.10"}}})
    udp = [p for p in behind_lb.container("media")["ports"] if p["protocol"] == "UDP"]
    assert udp and all("hostPort" not in p for p in udp)
    assert "affinity" not in behind_lb.workload("media")["spec"]["template"]["spec"]
    service = behind_lb.get("Service", f"{RELEASE}-braid-media-rtc")
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["protocol"]) for p in service["spec"]["ports"]] == [(p, "UDP") for p in range(40000, 40008)]
    assert behind_lb.env("media")["BRAID_RTC__NODE_IP"] == {"name": "BRAID_RTC__NODE_IP", "value": "203.0.113.10"}


def test_media_autoscaling_cpu_custom_metric_and_behavior(chart):
    out = render(chart, {"media": {"autoscaling": {"enabled": True, "participants": {"enabled": True}}}})
    hpa = out.get("HorizontalPodAutoscaler", f"{RELEASE}-braid-media")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-braid-media"}
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "braid_media_participants"
    assert metrics["Pods"]["pods"]["target"] == {"type": "AverageValue", "averageValue": "200"}
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] == 600 and scale_down["policies"][0] == {
        "type": "Pods", "value": 1, "periodSeconds": 300}
    assert "replicas" not in out.workload("media")["spec"], "the HPA owns the replica count"
    assert "prometheus-adapter" in out.files["braid/templates/NOTES.txt"]


def test_kubernetes_discovery_wiring(chart, variant):
    out = render(chart, variant, {"media": {"rtc": {"useNodeExternalIP": True}}})
    env = out.env("media")
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["BRAID_RTC__USE_NODE_EXTERNAL_IP"]["value"] == "true" and "BRAID_RTC__NODE_IP" not in env
    assert out.workload("media")["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    for role in ("signal", "router"):
        assert out.workload(role)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    role = out.of_kind("ClusterRole")[0]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = out.of_kind("ClusterRoleBinding")[0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-braid", "namespace": NAMESPACE}]
    off = render(chart, variant, {"kubeDiscovery": {"enabled": False}})
    assert not off.of_kind("ClusterRole") and not off.of_kind("ClusterRoleBinding")
    assert off.workload("media")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_scheduling_extras_and_optional_objects(chart, variant):
    extras = {
        "extraEnv": [{"name": "GLOBAL_FLAG", "value": "1"}],
        "extraEnvFrom": [{"configMapRef": {"name": "shared-env"}}],
        "extraVolumes": [{"name": "redis-ca", "secret": {"secretName": "redis-ca"}}],
        "extraVolumeMounts": [{"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}],
        "media": {"extraEnv": [{"name": "MEDIA_ONLY", "value": "1"}],
                  "nodeSelector": {"braid.dev/media": "true"},
                  "tolerations": [{"key": "media", "operator": "Exists", "effect": "NoSchedule"}],
                  "resources": {"requests": {"cpu": "4"}},
                  "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                                 "whenUnsatisfiable": "ScheduleAnyway"}]},
        "signal": {"ingress": {"enabled": True, "className": "nginx", "hosts": [{"host": "rtc.example.com"}],
                               "tls": [{"secretName": "rtc-tls", "hosts": ["rtc.example.com"]}]}},
        "serviceMonitor": {"enabled": True},
    }
    out = render(chart, variant, extras)
    media_pod = out.workload("media")["spec"]["template"]["spec"]
    env = out.env("media")
    assert env["GLOBAL_FLAG"]["value"] == "1" and env["MEDIA_ONLY"]["value"] == "1"
    assert "MEDIA_ONLY" not in out.env("signal") and "GLOBAL_FLAG" in out.env("router")
    assert out.container("router")["envFrom"] == [{"configMapRef": {"name": "shared-env"}}]
    assert {"name": "redis-ca", "secret": {"secretName": "redis-ca"}} in media_pod["volumes"]
    assert {"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True} in out.container("signal")["volumeMounts"]
    assert media_pod["nodeSelector"] == {"braid.dev/media": "true"}
    assert media_pod["tolerations"][0]["key"] == "media"
    assert out.container("media")["resources"]["requests"]["cpu"] == "4"
    (spread,) = media_pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "media"
    ingress = out.get("Ingress", f"{RELEASE}-braid")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-braid-signal", "port": {"name": "http"}}
    monitor = out.get("ServiceMonitor", f"{RELEASE}-braid")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert "wss://rtc.example.com" in out.files["braid/templates/NOTES.txt"]
    plain = render(chart, variant)
    assert not plain.of_kind("ServiceMonitor") and not plain.of_kind("Ingress")


def test_external_redis_and_missing_redis(chart):
    out = render(chart, {"redis": {"bundled": {"enabled": False}, "address": "redis.db.svc:6380", "username": "braid",
                                   "db": 2, "tls": True}})
    assert out.config_file()["redis"] == {"address": "redis.db.svc:6380", "username": "braid", "db": 2,
                                          "use_tls": True, "key_prefix": "braid"}
    assert not out.has("Deployment", f"{RELEASE}-braid-redis")
    assert "BRAID_REDIS__PASSWORD" not in out.env("router")
    bundled_with_password = render(chart, {"redis": {"password": SECRETS["redis"]}})
    redis = bundled_with_password.get("Deployment", f"{RELEASE}-braid-redis")["spec"]["template"]["spec"]
    assert "$(REDIS_PASSWORD)" in redis["containers"][0]["args"]
    with pytest.raises(helm.HelmRenderError, match="Braid's cluster roles need Redis"):
        render(chart, {"redis": {"bundled": {"enabled": False}}})


def _field_exists(dotted: str) -> bool:
    target: Any = Config()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            return False
        target = getattr(target, part)
    return True


def test_media_single_port_without_host_network(chart):
    """portList mode with media.udpPort: the one UDP port and the ICE-TCP port, on the node and behind the Service."""
    with pytest.raises(helm.HelmRenderError, match="media.workers"):
        render(chart, {"media": {"network": "portList"}})
    out = render(chart, {"media": {"network": "portList", "workers": 1, "portList": {"service": {"enabled": True}}}})
    ports = {(p["protocol"], p["containerPort"]): p for p in out.container("media")["ports"] if p["name"] != "http"
             and p["name"] != "grpc"}
    assert set(ports) == {("UDP", 7882), ("TCP", 7801)}
    assert all(p["hostPort"] == p["containerPort"] for p in ports.values())
    service = out.get("Service", f"{RELEASE}-braid-media-rtc")
    assert {(p["protocol"], p["port"]) for p in service["spec"]["ports"]} == {("UDP", 7882), ("TCP", 7801)}
    assert out.config_file()["rtc"]["udp_port"] == 7882 and out.config_file()["rtc"]["tcp_port"] == 7801


def test_coturn_deployed_with_the_shared_secret_wired_into_both(chart, tmp_path):
    values = {"coturn": {"enabled": True, "domain": "turn.example.com",
                         "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "letsencrypt"}}}}}
    out = render(chart, values)
    coturn = out.get("DaemonSet", f"{RELEASE}-braid-coturn")
    pod = coturn["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (container,) = pod["containers"]
    assert "--use-auth-secret" in container["args"] and "--static-auth-secret=$(TURN_SECRET)" in container["args"]
    secret_ref = {e["name"]: e for e in container["env"]}["TURN_SECRET"]["valueFrom"]["secretKeyRef"]
    for role in ("signal", "media"):
        assert out.env(role)["BRAID_TURN__SECRET"]["valueFrom"]["secretKeyRef"] == secret_ref, role
    shared = out.secret_data(secret_ref["name"])[secret_ref["key"]]
    assert len(shared) == 48 and shared not in _all_configmap_text(out)
    certificate = out.get("Certificate", f"{RELEASE}-braid-coturn")
    assert certificate["spec"]["dnsNames"] == ["turn.example.com"]
    assert pod["volumes"][0]["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert out.config_file()["turn"]["urls"] == [
        "turn:turn.example.com:3478?transport=udp", "turn:turn.example.com:3478?transport=tcp",
        "turns:turn.example.com:5349?transport=tcp"]
    # The server accepts what the chart hands it, and mints credentials under the shared secret.
    path = tmp_path / "braid.yaml"
    path.write_text(out.get("ConfigMap", f"{RELEASE}-braid")["data"]["braid.yaml"])
    config = load_config(str(path), env={"BRAID_TURN__SECRET": shared, "BRAID_KEYS": "k: s"})
    assert config.turn.secret == shared and config.turn.ttl == 86400

    with pytest.raises(helm.HelmRenderError, match="coturn.tls"):
        render(chart, {"coturn": {"enabled": True, "domain": "turn.example.com"}})
    with pytest.raises(helm.HelmRenderError, match="coturn.domain"):
        render(chart, {"coturn": {"enabled": True, "tls": {"secretName": "turn-tls"}}})
    own_tls = render(chart, {"coturn": {"enabled": True, "domain": "t.example.com", "tls": {"secretName": "turn-tls"},
                                        "existingSecret": "ops-coturn"}})
    assert not own_tls.of_kind("Certificate") and not own_tls.has("Secret", "ops-coturn")
    assert own_tls.env("media")["BRAID_TURN__SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "ops-coturn"


def test_existing_turn_service_with_a_shared_secret(chart):
    out = render(chart, {"turn": {"enabled": True, "urls": ["turns:turn.example.com:443?transport=tcp"],
                                  "secret": "shared-9f3", "ttl": 3600}})
    assert out.config_file()["turn"] == {"urls": ["turns:turn.example.com:443?transport=tcp"], "ttl": 3600}
    ref = out.env("media")["BRAID_TURN__SECRET"]["valueFrom"]["secretKeyRef"]
    assert out.secret_data(ref["name"])[ref["key"]] == "shared-9f3"
    assert "BRAID_TURN__USERNAME" not in out.env("media") and not out.of_kind("DaemonSet")


def test_rendered_config_and_env_load_in_the_server(chart, variant, tmp_path):
    """What the chart hands a pod (the ConfigMap file, its env and args) is accepted by braid's own config loader."""
    out = render(chart, variant, WITH_SECRETS, {"config": {"region": "eu-west"}})
    config_text = out.get("ConfigMap", f"{RELEASE}-braid")["data"]["braid.yaml"]
    if not _field_exists("turn.urls"):
        config_text = yaml.safe_dump({k: v for k, v in yaml.safe_load(config_text).items() if k != "turn"})
    path = tmp_path / "braid.yaml"
    path.write_text(config_text)
    field_refs = {"status.podIP": "10.42.0.7", "status.hostIP": "10.0.0.4", "spec.nodeName": "node-4"}
    secrets = {name: out.secret_data(name) for name in (f"{RELEASE}-braid-keys", f"{RELEASE}-braid-redis",
                                                         f"{RELEASE}-braid-turn")}
    for role in ROLES:
        env: dict[str, str] = {}
        for name, entry in out.env(role).items():
            if "value" in entry:
                env[name] = entry["value"]
            elif "fieldRef" in entry["valueFrom"]:
                env[name] = field_refs[entry["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                ref = entry["valueFrom"]["secretKeyRef"]
                env[name] = secrets[ref["name"]][ref["key"]]
        for name, field in PENDING_FIELDS.items():
            if name in env and not _field_exists(field):
                del env[name]
        tls_files = out.secret_data(f"{RELEASE}-braid-internal-tls")
        for name in [n for n in env if n.startswith("BRAID_INTERNAL_TLS__") and n.endswith("_FILE")]:
            mounted = Path(env[name])
            assert mounted.parent == Path("/etc/braid-tls"), name
            env[name] = str(tmp_path / mounted.name)
            (tmp_path / mounted.name).write_text(tls_files[mounted.name])
        args = out.container(role)["args"]
        config = load_config(str(path), env=env, overrides={
            "role": args[args.index("--role") + 1],
            "port": int(args[args.index("--port") + 1]),
            "grpc_port": int(args[args.index("--grpc-port") + 1]),
        })
        assert config.role == role and config.bind == "0.0.0.0" and config.grpc_bind == "10.42.0.7"
        assert config.keys == {"APIclusterkey": SECRETS["api"]}
        assert config.redis.password == SECRETS["redis"] and config.redis.sentinel_password == SECRETS["sentinel"]
        assert config.redis.sentinel_master_name == "braid" and config.redis.enabled
        assert config.router_address == f"{RELEASE}-braid-router:7881"
        assert config.region == "eu-west" and config.room.empty_timeout == 120
        if role == "media":
            assert config.rtc.node_ip == "10.0.0.4"
            assert (config.rtc.port_range_start, config.rtc.port_range_end) in ((50000, 60000), (40000, 40007))
        if _field_exists("drain_deadline"):
            assert float(config.drain_deadline) == 300
        assert config.internal_tls.enabled and config.internal_tls.server_name == "braid.internal"


BAD_VALUES = {
    "replicas-as-string": ("signal:\n  replicas: \"3\"\n", "/signal/replicas"),
    "drain-deadline-as-string": ("drain:\n  deadlineSeconds: 5m\n", "/drain/deadlineSeconds"),
    "unknown-drain-field": ("drain:\n  deadlineSeconds: 60\n  timeout: 30\n", "/drain"),
    "unknown-media-network": ("media:\n  network: hostPort\n", "/media/network"),
    "port-out-of-range": ("media:\n  portList:\n    start: 70000\n    count: 4\n", "/media/portList/start"),
    "short-api-secret": ("apiKeys:\n  keys:\n    APIk: short\n", "/apiKeys/keys/APIk"),
    "unknown-top-level-key": ("replicaCount: 3\n", "replicaCount"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values_file(chart, variant, case, tmp_path):
    text, where = BAD_VALUES[case]
    bad_file = tmp_path / "bad-values.yaml"
    bad_file.write_text(text)
    values = merge(variant, helm.values_from_yaml(bad_file.read_text()))
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART, values, namespace=NAMESPACE)
    assert any(where in error for error in report["errors"]), report
    chart.validate_schema(merge(variant, WITH_SECRETS))  # and the good ones pass


def test_internal_mutual_tls_sources(chart, variant):
    """The chart's own CA and certificate (genCA/genSignedCert), a Secret the operator manages, or cert-manager."""
    from cryptography import x509

    out = render(chart, variant)
    data = out.secret_data(f"{RELEASE}-braid-internal-tls")
    assert out.get("Secret", f"{RELEASE}-braid-internal-tls")["type"] == "kubernetes.io/tls"
    ca, cert = x509.load_pem_x509_certificate(data["ca.crt"].encode()), \
        x509.load_pem_x509_certificate(data["tls.crt"].encode())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert names == ["braid.internal"] and "PRIVATE KEY" in data["tls.key"]
    for role in ROLES:
        env = out.env(role)
        assert env["BRAID_INTERNAL_TLS__CA_FILE"]["value"] == "/etc/braid-tls/ca.crt"
        assert env["BRAID_INTERNAL_TLS__SERVER_NAME"]["value"] == "braid.internal"
        pod = out.workload(role)["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "internal-tls")
        assert volume["secret"]["secretName"] == f"{RELEASE}-braid-internal-tls"
        assert {"name": "internal-tls", "mountPath": "/etc/braid-tls", "readOnly": True} in \
            out.container(role)["volumeMounts"]

    own = render(chart, variant, {"internalTLS": {"source": "existingSecret", "existingSecret": "my-tls"}})
    assert not own.has("Secret", f"{RELEASE}-braid-internal-tls")
    pod = own.workload("media")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "internal-tls")["secret"]["secretName"] == "my-tls"
    with pytest.raises(Exception, match="internalTLS.existingSecret"):
        render(chart, variant, {"internalTLS": {"source": "existingSecret"}})

    managed = render(chart, variant, {"internalTLS": {"source": "certManager", "certManager": {
        "issuerRef": {"name": "braid-ca", "kind": "ClusterIssuer"}}}})
    certificate = managed.get("Certificate", f"{RELEASE}-braid-internal-tls")
    assert certificate["spec"]["secretName"] == f"{RELEASE}-braid-internal-tls"
    assert certificate["spec"]["dnsNames"] == ["braid.internal"]
    assert set(certificate["spec"]["usages"]) == {"server auth", "client auth"}
    assert certificate["spec"]["issuerRef"]["name"] == "braid-ca"
    with pytest.raises(Exception, match="issuerRef.name"):
        render(chart, variant, {"internalTLS": {"source": "certManager"}})

    off = render(chart, variant, {"internalTLS": {"enabled": False}})
    assert not off.has("Secret", f"{RELEASE}-braid-internal-tls")
    assert "BRAID_INTERNAL_TLS__CA_FILE" not in off.env("signal")


def test_network_policies_keep_grpc_to_braid(chart, variant):
    out = render(chart, variant)
    policies = {p["metadata"]["name"]: p for p in out.of_kind("NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-braid-{role}" for role in ROLES}
    for role in ROLES:
        spec = policies[f"{RELEASE}-braid-{role}"]["spec"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
        grpc_rule, open_rule = spec["ingress"]
        # media: every worker's gRPC port (media.workers, 7881, 7883, ...)
        wanted = {"port": 7881, "protocol": "TCP", **({"endPort": 7881 + 2 * 63} if role == "media" else {})}
        assert grpc_rule["ports"] == [wanted]
        (peer,) = grpc_rule["from"]
        assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
        assert "from" not in open_rule, "HTTP and UDP stay open"
        assert open_rule["ports"][0] == {"port": 7880, "protocol": "TCP"}
        if role == "media":
            udp = open_rule["ports"][1]
            assert udp["protocol"] == "UDP" and udp["endPort"] > udp["port"]
    assert not render(chart, variant, {"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy")
