"""Grafana: provisioned datasource and dashboards, well-formed dashboard JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from deploy_support import DEPLOY, REPO, dashboard_exprs

GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def _datasource() -> dict:
    data = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = data["datasources"]
    return source


def _walk(panels):
    for panel in panels:
        yield panel
        yield from _walk(panel.get("panels", []))


def test_datasource_points_at_the_compose_prometheus() -> None:
    source = _datasource()
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert "prometheus" in compose["services"]


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "mailgate.yml").read_text()
    )
    (entry,) = provider["providers"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{entry['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_five_dashboards_cover_the_issue() -> None:
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {
        "mailgate / Pipeline",
        "mailgate / Postal",
        "mailgate / Customer webhooks",
        "mailgate / Campaigns",
        "mailgate / Mail.ru Postmaster",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path) -> None:
    board = json.loads(path.read_text())
    uid = _datasource()["uid"]
    assert board["uid"] and len(board["uid"]) <= 40
    panels = list(_walk(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            assert target["expr"].strip()
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == uid
    assert dashboard_exprs(board)


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_dashboards_are_generated_from_dashboards_py() -> None:
    proc = subprocess.run(
        [sys.executable, str(GRAFANA / "dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
