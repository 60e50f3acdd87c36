"""Helpers of the deploy tests: compose interpolation, a small kustomize renderer, the metric
names the code registers and the metric names PromQL expressions use.

The kustomize renderer covers what deploy/k8s uses (and fails loudly on anything else):
``resources`` (files and directories), ``namespace``, ``labels`` (metadata only),
``images``, ``secretGenerator``/``configMapGenerator`` (``envs``, ``literals``; name hash
disabled) and ``patches`` with a ``path`` (strategic merge: maps merge, lists of maps merge
by ``name`` with new items first as kustomize puts them, other lists are replaced). When
``kubectl`` is installed the tests compare its ``kubectl kustomize`` output with this one,
so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
DEPLOY = REPO / "deploy"

#: Every service of design.md -> (python package, Settings import path)
SERVICES: dict[str, str] = {
    "smtp-ingest": "mailgate_smtp_ingest",
    "postal-sender": "mailgate_postal_sender",
    "webhook-ingest": "mailgate_webhook_ingest",
    "tracker": "mailgate_tracker",
    "ledger": "mailgate_ledger",
    "ams-reporter": "mailgate_ams_reporter",
    "stats-poller": "mailgate_stats_poller",
}


def settings_env_names(service: str) -> set[str]:
    """Env vars the service reads: its Settings fields, upper-cased."""
    module = importlib.import_module(f"{SERVICES[service]}.app")
    return {name.upper() for name in module.Settings.__struct_fields__}


def struct_env_names(cls: type) -> set[str]:
    return {name.upper() for name in cls.__struct_fields__}  # type: ignore[attr-defined]


def require_tool(name: str) -> str | None:
    """Path of ``name``; ``None`` locally when missing (skip), a failure under CI=true."""
    path = shutil.which(name)
    if path is None and os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        raise AssertionError(f"{name} is required under CI=true (tools/system-packages.sh)")
    return path


# --- compose --------------------------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation (``${VAR}``, ``${VAR:-default}``, ``${VAR:?err}``,
    ``$$``) applied to every string of ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else str(current)
        if op in (":?", "?"):
            if unset:
                raise InterpolationError(f"{name}: {arg}")
            return str(current)
        if op in (":+", "+"):
            return "" if unset else arg
        return "" if current is None else current

    return _VAR.sub(one, value)


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip()
    return out


def resolve_merges(value: Any) -> Any:
    """YAML merge keys are resolved by PyYAML already; drop ``x-`` extension fields."""
    if isinstance(value, dict):
        return {k: resolve_merges(v) for k, v in value.items() if not str(k).startswith("x-")}
    return value


def compose_environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --- kustomize ------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "labels",
        "images",
        "secretGenerator",
        "configMapGenerator",
        "patches",
    }
    unknown = set(spec) - known
    assert not unknown, f"{directory}: the test renderer does not implement {unknown}"
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        docs += render_kustomization(path) if path.is_dir() else _load_docs(path)
    for kind, key in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        for gen in spec.get(key, []):
            docs.append(_generate(directory, kind, gen))
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, f"only path patches are implemented: {patch}"
        for change in _load_docs(directory / patch["path"]):
            target = _find(docs, change["kind"], change["metadata"]["name"])
            merged = strategic_merge(target, change)
            docs[docs.index(target)] = merged
    for label_set in spec.get("labels", []):
        assert not label_set.get("includeSelectors") and not label_set.get("includeTemplates")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
    for image in spec.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                if container["image"].split(":")[0].split("@")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    if "digest" in image:
                        container["image"] = f"{name}@{image['digest']}"
                    else:
                        tag = image.get("newTag")
                        container["image"] = f"{name}:{tag}" if tag else name
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def _generate(directory: Path, kind: str, gen: Mapping[str, Any]) -> dict[str, Any]:
    assert set(gen) <= {"name", "envs", "literals", "options"}, gen
    assert gen.get("options", {}).get("disableNameSuffixHash"), "hash suffixes not implemented"
    data: dict[str, str] = {}
    for env_file in gen.get("envs", []):
        data.update(read_env_file(directory / env_file))
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
    if kind == "Secret":
        doc["type"] = "Opaque"
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        doc["data"] = data
    return doc


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"patch target {kind}/{name}: {len(found)} matches"
    return found[0]


def strategic_merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in [*base, *patch])
    ):
        # like kustomize: items new to the list come first, merged ones keep their place
        out_list = [dict(i) for i in base]
        added = []
        for item in patch:
            match = [i for i, b in enumerate(out_list) if b["name"] == item["name"]]
            if match:
                out_list[match[0]] = strategic_merge(out_list[match[0]], item)
            else:
                added.append(item)
        return added + out_list
    return patch


def _containers(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def kubectl_kustomize(directory: Path) -> list[dict[str, Any]] | None:
    """``kubectl kustomize`` output, or ``None`` without a working kubectl."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed: {proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_key(docs: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def strict_schema(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as a JSON Schema that refuses unknown fields (Kubernetes
    prunes them silently, which hides typos)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def crd_schema(file_name: str, api_version: str) -> Any:
    data = json.loads((SCHEMAS / file_name).read_text())
    group, version = api_version.split("/")
    assert group == data["group"], (group, data["group"])
    return strict_schema(data["versions"][version])


# --- metrics --------------------------------------------------------------------------------


def _metric_objects(registry: CollectorRegistry) -> None:
    """Create every metrics object of libs and services on ``registry`` (keep in step with
    ``test_metric_classes_cover_every_literal_metric``)."""
    from mailgate_ams_reporter.metrics import AutostopMetrics, WebhookMetrics
    from mailgate_core.nats import ConsumerLag, count_publish_batches
    from mailgate_ledger.metrics import LedgerMetrics
    from mailgate_postal_sender.metrics import Metrics as PostalMetrics
    from mailgate_smtp_ingest.metrics import Metrics as SmtpMetrics
    from mailgate_stats_poller.poller import AmsMetrics
    from mailgate_stats_poller.postmaster_poller import PostmasterMetrics
    from mailgate_tracker.handlers import TrackerMetrics
    from mailgate_tracker.publisher import BufferMetrics
    from mailgate_webhook_ingest.handlers import Metrics as WebhookIngestMetrics

    WebhookMetrics(registry)
    AutostopMetrics(registry)
    ConsumerLag(None, registry)  # type: ignore[arg-type]
    count_publish_batches(None, registry)
    LedgerMetrics(registry)
    PostalMetrics(registry)
    SmtpMetrics.create(registry)
    AmsMetrics(registry)
    PostmasterMetrics(registry)
    TrackerMetrics.create(registry)
    BufferMetrics.create(registry)
    WebhookIngestMetrics(registry)


_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def code_metric_families() -> dict[str, str]:
    """Metric family name -> type, for everything the code registers."""
    registry = CollectorRegistry()
    _metric_objects(registry)
    return {family.name: family.type for family in registry.collect()}


def code_sample_names() -> set[str]:
    """The series names Prometheus stores for the code's metrics (counters end in _total,
    histograms have _bucket/_sum/_count)."""
    names: set[str] = set()
    for family, kind in code_metric_families().items():
        names.update(family + suffix for suffix in _SUFFIXES[kind])
    return names


_LITERAL_METRIC = re.compile(
    r"\b(?:Counter|Gauge|Histogram|Summary)\(\s*\"(mailgate_[a-z0-9_]+)\"", re.MULTILINE
)


def literal_metric_names() -> set[str]:
    """Metric names written as literals in Counter/Gauge/Histogram calls of libs and services
    (the prometheus_client family name: a counter's ``_total`` is dropped)."""
    found: set[str] = set()
    for root in (REPO / "libs", REPO / "services"):
        for path in root.rglob("*.py"):
            for name in _LITERAL_METRIC.findall(path.read_text()):
                found.add(name.removesuffix("_total"))
    return found


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![A-Za-z0-9_:])([A-Za-z_:][A-Za-z0-9_:]*)")


def promql_metric_names(expr: str) -> set[str]:
    """``mailgate_*`` series and ``mailgate:*`` recording rules an expression selects."""
    bare = _STRING.sub('""', expr)
    bare = re.sub(r"\{[^{}]*\}", "{}", bare)  # label matchers name labels, not metrics
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    return {n for n in _IDENT.findall(bare) if n.startswith(("mailgate_", "mailgate:"))}


def unknown_metrics(
    exprs: Iterable[str], known_samples: set[str], recorded: set[str]
) -> dict[str, set[str]]:
    """expression -> the metric names it uses that neither the code nor a rule defines."""
    bad: dict[str, set[str]] = {}
    for expr in exprs:
        missing = {
            n
            for n in promql_metric_names(expr)
            if ((n not in recorded) if ":" in n else (n not in known_samples))
        }
        if missing:
            bad[expr] = missing
    return bad


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[str]:
    exprs: list[str] = []

    def walk(panels: Iterable[Mapping[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if "expr" in t)
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if isinstance(query, str):
            exprs.append(query)
    return exprs


def rule_groups() -> dict[Path, list[dict[str, Any]]]:
    return {
        path: yaml.safe_load(path.read_text())["groups"]
        for path in sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
    }


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for groups in rule_groups().values()
        for group in groups
        for rule in group["rules"]
        if "record" in rule
    }


def rule_exprs() -> list[str]:
    return [
        str(rule["expr"])
        for groups in rule_groups().values()
        for group in groups
        for rule in group["rules"]
    ]
