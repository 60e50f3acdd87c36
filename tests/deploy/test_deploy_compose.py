"""docker-compose.yml: valid against the compose-spec schema (what `docker compose config`
checks, without a Docker engine), in step with the services' settings and design.md's ports."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml
from deploy_support import (
    DEPLOY,
    REPO,
    SCHEMAS,
    SERVICES,
    InterpolationError,
    compose_environment,
    interpolate,
    read_env_file,
    settings_env_names,
    struct_env_names,
)
from mailgate_ledger.bootstrap import BootstrapSettings

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return read_env_file(REPO / ".env")


@pytest.fixture(scope="module")
def compose(raw: dict, dotenv: dict[str, str]) -> dict:
    """The configuration `docker compose config` would print with the shipped .env."""
    return interpolate(raw, dotenv)


def _validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_spec(raw: dict, compose: dict) -> None:
    validator = _validator()
    for document in (raw, compose):
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_schema_validation_catches_a_typo(compose: dict) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["ledger"]["enviroment"] = {"X": "1"}
    assert list(_validator().iter_errors(broken))


def test_interpolation_needs_the_documented_variables(raw: dict) -> None:
    with pytest.raises(InterpolationError, match="POSTAL_API_KEY"):
        interpolate(raw, {})


def test_every_service_and_the_stack_around_it(compose: dict) -> None:
    services = compose["services"]
    expected = set(SERVICES) | {
        "nats",
        "postgres",
        "init",
        "postal-sandbox",
        "prometheus",
        "grafana",
        "cli",
    }
    assert set(services) == expected
    for name in SERVICES:
        build = services[name]["build"]
        assert build["dockerfile"] == "deploy/Dockerfile"
        assert build["args"]["SERVICE"] == name
    assert services["init"]["command"] == ["mailgate-ledger", "bootstrap"]
    assert services["postal-sandbox"]["profiles"] == ["sandbox"]
    assert services["postal-sandbox"]["build"]["args"]["SERVICE"] == "fakes"
    assert services["cli"]["profiles"] == ["tools"]
    assert services["cli"]["entrypoint"][-1] == "mailgate"


def test_service_env_vars_exist_in_their_settings(compose: dict) -> None:
    for name, service in compose["services"].items():
        if name in SERVICES:
            known = settings_env_names(name)
        elif name == "init":
            known = struct_env_names(BootstrapSettings)
        else:
            continue
        env = compose_environment(service)
        names = {k.removesuffix("_FILE") if k.endswith("_FILE") else k for k in env}
        assert names <= known, f"{name}: not settings of the service: {sorted(names - known)}"


def test_secret_files_come_from_declared_secrets(compose: dict, dotenv: dict[str, str]) -> None:
    declared = compose["secrets"]
    for name, service in compose["services"].items():
        mounted = set(service.get("secrets", []))
        assert mounted <= set(declared), name
        for key, value in compose_environment(service).items():
            if key.endswith("_FILE") and value.startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in mounted, (name, key)
    for secret in declared.values():
        assert secret["environment"] in dotenv  # every secret has a (demo) value


def test_demo_secrets_are_marked(dotenv: dict[str, str]) -> None:
    for key in (
        "ADMIN_TOKEN",
        "TRACKING_SECRET",
        "POSTGRES_PASSWORD",
        "BOOTSTRAP_SMTP_PASSWORD",
        "BOOTSTRAP_API_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
        "POSTAL_API_KEY",
    ):
        assert "DEMO" in dotenv[key], key
    assert dotenv["POSTGRES_PASSWORD"] in dotenv["DATABASE_URL"]
    assert dotenv["COMPOSE_PROFILES"] == "sandbox"
    raw_text = COMPOSE.read_text()
    for key in ("ADMIN_TOKEN", "TRACKING_SECRET", "POSTGRES_PASSWORD", "BOOTSTRAP_SMTP_PASSWORD"):
        assert dotenv[key] not in raw_text  # values live in .env, not in the compose file


def test_bootstrap_settings_accept_the_demo_values(compose: dict, dotenv: dict[str, str]) -> None:
    from mailgate_core.config import load_settings

    env = compose_environment(compose["services"]["init"])
    secrets = {s: dotenv[compose["secrets"][s]["environment"]] for s in compose["secrets"]}
    resolved = {
        k.removesuffix("_FILE"): secrets[v.removeprefix("/run/secrets/")]
        if k.endswith("_FILE")
        else v
        for k, v in env.items()
    }
    settings = load_settings(BootstrapSettings, resolved)
    assert settings.bootstrap_smtp_username == "demo"
    assert settings.bootstrap_sender_domains == ["example.com"]


def test_ports_match_design(compose: dict) -> None:
    services = compose["services"]

    def published(name: str) -> dict[int, int]:
        out = {}
        for spec in services[name].get("ports", []):
            *_, host, container = spec.split(":")
            out[int(container)] = int(host)
        return out

    smtp = compose_environment(services["smtp-ingest"])
    assert (smtp["SMTP_PORT"], smtp["SMTPS_PORT"]) == (
        "587",
        "465",
    )  # design: 587/465 in containers
    assert published("smtp-ingest") == {587: 587, 465: 465}
    assert published("webhook-ingest") == {8081: 8081}
    assert published("tracker") == {8082: 8082}
    assert published("ledger") == {8080: 8080}
    assert compose_environment(services["webhook-ingest"])["WEBHOOK_PORT"] == "8081"
    assert compose_environment(services["tracker"])["TRACKER_PORT"] == "8082"
    assert compose_environment(services["ledger"])["ADMIN_PORT"] == "8080"
    design = REPO.parent / "shared" / "design.md"
    if design.exists():
        text = design.read_text()
        assert "`SMTP_PORT=2587` (587 in containers)" in text
        assert "ledger admin API | `:8080`" in text


def test_nats_runs_jetstream_with_sync_always(compose: dict) -> None:
    nats = compose["services"]["nats"]
    assert "./deploy/nats.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
    assert nats["command"] == ["-c", "/etc/nats/nats.conf"]
    conf = (DEPLOY / "nats.conf").read_text()
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.MULTILINE)
    store = re.search(r'store_dir:\s*"([^"]+)"', conf)
    assert store is not None
    data_mounts = [v.split(":")[1] for v in nats["volumes"] if v.startswith("nats-data:")]
    assert data_mounts and store.group(1).startswith(data_mounts[0])


def test_images_are_pinned(compose: dict) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert re.search(r":v?\d+\.\d+[.\d]*(-[a-z]+)?$", image) or "@sha256:" in image, (
            name,
            image,
        )


def test_dependencies_exist_and_order_the_start(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        deps = service.get("depends_on", {})
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, (name, dep)
    assert services["ledger"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("postal-sender", "webhook-ingest"):
        sandbox = services[name]["depends_on"]["postal-sandbox"]
        assert sandbox == {"condition": "service_healthy", "required": False}


def test_webhook_ingest_trusts_the_sandbox_key(compose: dict) -> None:
    sandbox = compose["services"]["postal-sandbox"]
    ingest = compose_environment(compose["services"]["webhook-ingest"])
    key_out = next(a for a in sandbox["command"] if a.startswith("--public-key-out="))
    assert key_out.split("=", 1)[1] == ingest["POSTAL_WEBHOOK_PUBLIC_KEY_FILE"]
    assert "--webhook-url=http://webhook-ingest:8081/api/v1/webhook" in sandbox["command"]
    api_key = next(a for a in sandbox["command"] if a.startswith("--api-key="))
    assert compose_environment(compose["services"]["postal-sender"])["POSTAL_API_URL"] == (
        "http://postal-sandbox:5080"
    )
    assert api_key.split("=", 1)[1]
