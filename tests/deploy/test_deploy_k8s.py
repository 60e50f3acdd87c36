"""deploy/k8s: the kustomize base and example overlay render, validate against the Kubernetes
schemas (and the vendored KEDA / CloudNativePG CRD schemas), and agree with the code."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_support import (
    DEPLOY,
    REPO,
    SCHEMAS,
    SERVICES,
    by_key,
    crd_schema,
    kubectl_kustomize,
    render_kustomization,
    settings_env_names,
)

K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"
CRDS = {
    "keda.sh/v1alpha1": {"ScaledObject": "keda-scaledobject.json"},
    "postgresql.cnpg.io/v1": {"Cluster": "cnpg-cluster.json"},
}
HTTP_INTAKE = {"smtp-ingest", "webhook-ingest", "tracker"}
QUEUE_CONSUMERS = {"postal-sender", "ledger", "ams-reporter"}


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render_kustomization(K8S / "base")


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return render_kustomization(K8S / "overlays" / "example")


@pytest.fixture(params=["base", "overlay"])
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue(request.param)


def _of(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("where", ["base", "overlays/example"])
def test_renderer_agrees_with_kubectl(where: str) -> None:
    ours = render_kustomization(K8S / where)
    theirs = kubectl_kustomize(K8S / where)
    if theirs is None:
        pytest.skip("kubectl not installed: checked with the test renderer only")
    assert by_key(ours).keys() == by_key(theirs).keys()
    for key, doc in by_key(theirs).items():
        assert by_key(ours)[key] == doc, key


def test_kubernetes_resources_validate(docs: list[dict[str, Any]]) -> None:
    checked = 0
    for doc in docs:
        if doc["apiVersion"] in CRDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        checked += 1
    assert checked >= 30


def test_custom_resources_validate_against_their_crds(docs: list[dict[str, Any]]) -> None:
    kinds = set()
    for doc in docs:
        kind_files = CRDS.get(doc["apiVersion"])
        if kind_files is None:
            continue
        schema = crd_schema(kind_files[doc["kind"]], doc["apiVersion"])
        jsonschema.validate(doc, schema)
        kinds.add(doc["kind"])
    assert kinds == {"ScaledObject", "Cluster"}


def test_crd_validation_catches_a_typo(base: list[dict[str, Any]]) -> None:
    scaled = json.loads(json.dumps(_of(base, "ScaledObject")["ledger"]))
    scaled["spec"]["maxReplicas"] = 3  # the field is maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, crd_schema("keda-scaledobject.json", "keda.sh/v1alpha1"))


def test_vendored_schemas_name_their_source() -> None:
    sources = (SCHEMAS / "SOURCES.md").read_text()
    for name in (
        "compose-spec.json",
        "keda-scaledobject.json",
        "cnpg-cluster.json",
        "nats-chart-values.yaml",
    ):
        assert name in sources


def test_every_service_has_probes_resources_and_a_disruption_budget(docs) -> None:
    deployments = _of(docs, "Deployment")
    assert set(deployments) == set(SERVICES)
    pdbs = _of(docs, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        container = _container(deployment)
        ports = {p["name"] for p in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ports
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
        assert security["capabilities"]["drop"] == ["ALL"]
        assert not security["allowPrivilegeEscalation"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == selector
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "mailgate"  # network policies select it
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > 25  # SHUTDOWN_GRACE_S of mailgate-common plus the preStop pause


def test_scaling_http_on_cpu_and_consumers_on_lag(docs) -> None:
    hpas = _of(docs, "HorizontalPodAutoscaler")
    scaled = _of(docs, "ScaledObject")
    assert set(hpas) == HTTP_INTAKE
    assert set(scaled) == QUEUE_CONSUMERS
    assert not set(hpas) & set(scaled)  # KEDA owns the HPA of what it scales
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
    for name, obj in scaled.items():
        assert obj["spec"]["scaleTargetRef"]["name"] == name
        assert any(t["type"] == "nats-jetstream" for t in obj["spec"]["triggers"])
    assert _of(docs, "Deployment")["stats-poller"]["spec"]["replicas"] == 1


def test_keda_triggers_watch_the_consumers_the_code_creates(base) -> None:
    from mailgate_ams_reporter.app import DURABLE as AMS_DURABLE
    from mailgate_ams_reporter.app import RETRY_DURABLE
    from mailgate_ams_reporter.retry import RETRY_STREAM
    from mailgate_core.nats import STREAMS
    from mailgate_ledger.ingest import CONSUMERS
    from mailgate_postal_sender.app import DURABLE as POSTAL_DURABLE

    expected = {
        "postal-sender": {("MAIL", POSTAL_DURABLE)},
        "ledger": {(stream, durable) for stream, durable, _ in CONSUMERS},
        "ams-reporter": {("STATUS", AMS_DURABLE), (RETRY_STREAM, RETRY_DURABLE)},
    }
    streams = {s.name for s in STREAMS} | {RETRY_STREAM}
    for name, obj in _of(base, "ScaledObject").items():
        watched = {
            (t["metadata"]["stream"], t["metadata"]["consumer"])
            for t in obj["spec"]["triggers"]
            if t["type"] == "nats-jetstream"
        }
        assert watched == expected[name]
        assert {s for s, _ in watched} <= streams


def test_env_vars_are_settings_and_their_sources_exist(overlay) -> None:
    configmaps = _of(overlay, "ConfigMap")
    secrets = _of(overlay, "Secret")
    common = set(configmaps["mailgate-common"]["data"])
    for name, deployment in _of(overlay, "Deployment").items():
        container = _container(deployment)
        known = settings_env_names(name)
        names = {e["name"] for e in container["env"]} | common
        assert names <= known, f"{name}: {sorted(names - known)}"
        for entry in container["env"]:
            source = entry.get("valueFrom", {})
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["key"] in configmaps[ref["name"]]["data"], (name, ref)
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                if ref["name"] == "mailgate-pg-app":  # created by CloudNativePG
                    assert ref["key"] == "uri"
                    continue
                assert ref["key"] in secrets[ref["name"]]["data"], (name, ref)


def test_ports_follow_the_settings(docs) -> None:
    deployments = _of(docs, "Deployment")
    services = _of(docs, "Service")
    port_vars = {"smtp": "SMTP_PORT", "smtps": "SMTPS_PORT", "ops": "OPS_PORT"}
    http_vars = {
        "ledger": "ADMIN_PORT",
        "webhook-ingest": "WEBHOOK_PORT",
        "tracker": "TRACKER_PORT",
    }
    for name, deployment in deployments.items():
        container = _container(deployment)
        env = {e["name"]: e.get("value") for e in container["env"]}
        for port in container["ports"]:
            var = http_vars[name] if port["name"] == "http" else port_vars[port["name"]]
            assert env[var] == str(port["containerPort"]), (name, var)
        named = {p["name"] for p in container["ports"]}
        for service_port in services[name]["spec"]["ports"]:
            assert service_port["targetPort"] in named
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        metrics = next(p for p in container["ports"] if p["name"] in ("ops", "http"))
        assert annotations["prometheus.io/port"] == str(metrics["containerPort"])
    smtp = {p["name"]: p["port"] for p in services["smtp-ingest"]["spec"]["ports"]}
    assert (smtp["smtp"], smtp["smtps"]) == (587, 465)


def test_jetstream_replicas_and_database(docs) -> None:
    common = _of(docs, "ConfigMap")["mailgate-common"]["data"]
    assert common["JETSTREAM_REPLICAS"] == "3"
    assert common["NATS_URL"].startswith("nats://nats.nats.svc")
    cluster = _of(docs, "Cluster")["mailgate-pg"]
    assert cluster["spec"]["instances"] == 3
    assert cluster["spec"]["bootstrap"]["initdb"]["database"] == "mailgate"


def test_network_policies_select_real_pods(docs) -> None:
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"] for d in _of(docs, "Deployment").values()
    ]
    pod_labels.append({"cnpg.io/cluster": _of(docs, "Cluster")["mailgate-pg"]["metadata"]["name"]})

    def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In"
            if labels.get(expr["key"]) not in expr["values"]:
                return False
        return True

    policies = _of(docs, "NetworkPolicy")
    assert "mailgate-default-deny" in policies
    for name, policy in policies.items():
        assert any(selects(policy["spec"]["podSelector"], labels) for labels in pod_labels), name


def test_overlay_sets_namespace_images_and_placeholder_secrets(overlay) -> None:
    for doc in overlay:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "mailgate"
    for deployment in _of(overlay, "Deployment").values():
        assert re.fullmatch(
            r"registry\.example\.com/mailgate/[a-z-]+:1\.0\.0", _container(deployment)["image"]
        )
    secret = _of(overlay, "Secret")["mailgate-secrets"]
    for key in ("ADMIN_TOKEN", "TRACKING_SECRET", "POSTAL_API_KEY", "POSTAL_WEBHOOK_PUBLIC_KEY"):
        assert base64.b64decode(secret["data"][key]).decode().startswith("CHANGE-ME")


# --- NATS Helm values -----------------------------------------------------------------------

FREE_FORM = {"merge", "patch", "resources", "topologySpreadConstraints", "env"}


def _unknown_keys(ours: Any, chart: Any, path: str = "") -> list[str]:
    if not isinstance(ours, dict):
        return []
    unknown = []
    for key, value in ours.items():
        where = f"{path}.{key}" if path else key
        if not isinstance(chart, dict) or key not in chart:
            unknown.append(where)
        elif key not in FREE_FORM:
            unknown += _unknown_keys(value, chart[key], where)
    return unknown


def test_nats_values_are_chart_values_for_a_jetstream_cluster() -> None:
    values = yaml.safe_load((K8S / "nats" / "values.yaml").read_text())
    chart = yaml.safe_load((SCHEMAS / "nats-chart-values.yaml").read_text())
    assert not _unknown_keys(values, chart)
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    jetstream = values["config"]["jetstream"]
    assert jetstream["enabled"] and jetstream["fileStore"]["enabled"]
    assert jetstream["merge"]["sync_interval"] == "always"
    assert values["service"]["ports"]["monitor"]["enabled"]  # KEDA reads :8222
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert compose["services"]["nats"]["image"] == f"nats:{values['container']['image']['tag']}"


def test_kubernetes_validation_catches_a_typo(base) -> None:
    deployment = json.loads(json.dumps(_of(base, "Deployment")["tracker"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_keda_trigger_metadata_is_what_the_scaler_reads(base) -> None:
    # https://keda.sh/docs/latest/scalers/nats-jetstream/ (metadata is a free string map)
    known = {
        "natsServerMonitoringEndpoint",
        "account",
        "stream",
        "consumer",
        "lagThreshold",
        "activationLagThreshold",
        "useHttps",
    }
    for obj in _of(base, "ScaledObject").values():
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] == "nats-jetstream":
                assert set(trigger["metadata"]) <= known
                assert int(trigger["metadata"]["lagThreshold"]) > 0
