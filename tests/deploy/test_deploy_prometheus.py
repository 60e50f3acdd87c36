"""Prometheus: promtool checks the config and the alert rules; every service is scraped on
the port it serves /metrics on."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
from pathlib import Path

import msgspec
import pytest
import yaml
from deploy_support import DEPLOY, SERVICES, require_tool, rule_groups

PROMETHEUS = DEPLOY / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = require_tool("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus; tools/system-packages.sh)")
    return path


def _healthcheck():
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_promtool_check_rules(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "check", "rules", *map(str, RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(RULES)


def test_promtool_check_config_with_its_rules(promtool: str, tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]  # the compose mount
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in proc.stdout


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    """Alert scenarios: consumer lag, campaign hard bounces, Postmaster DNS trouble."""
    tests = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    proc = subprocess.run(
        [promtool, "test", "rules", *map(str, tests)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_service_is_scraped_where_it_serves_metrics() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "mailgate"]
    scraped = {name: sd["port"] for sd in job["dns_sd_configs"] for name in sd["names"]}
    ports = _healthcheck().HEALTH_PORTS
    assert scraped == {service: ports[service][1] for service in SERVICES}


def test_health_ports_are_the_settings_defaults() -> None:
    """The image's healthcheck and Prometheus use each service's default /metrics port."""
    for service, (var, port) in _healthcheck().HEALTH_PORTS.items():
        module = importlib.import_module(f"{SERVICES[service]}.app")
        info = msgspec.inspect.type_info(module.Settings)
        defaults = {f.name: f.default for f in info.fields}
        assert defaults[var.lower()] == port, (service, var)


def test_alerts_have_severity_and_summary() -> None:
    names = []
    for path, groups in rule_groups().items():
        for group in groups:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                names.append(rule["alert"])
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}, path
                assert rule["annotations"]["summary"], rule["alert"]
    assert len(names) == len(set(names))
    for topic in (
        "ConsumerLag",
        "PostalErrors",
        "WebhookEndpointFailing",
        "WebhookLagHigh",
        "CampaignHardBounceRate",
        "CampaignComplaintRate",
        "CampaignUnsubscribeRate",
        "CampaignAutoStopped",
        "PostmasterDnsTrouble",
        "PostmasterReputationFalling",
        "PostmasterSpamRate",
    ):
        assert any(topic in n for n in names), topic
