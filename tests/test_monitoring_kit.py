"""contrib/: the Prometheus rules pass promtool and their unit tests; the rules and the Grafana
dashboard use only metrics a real /metrics page has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from daemonproc import config_with, login
from kakao_tokend.emulator import KakaoEmulator
from served import serving

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "kakao-tokend.json"
#: The series Prometheus itself records for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})
#: Names in PromQL that are metrics of ours, of the standard collectors, or Prometheus' own.
METRIC_RE = re.compile(r"\b(?:kakao_tokend_\w+|process_\w+|python_\w+|up)\b")
#: Grafana's variables, replaced by values PromQL accepts when the queries are parsed.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*", "$account": ".*"}


async def scraped_names(emulator: KakaoEmulator, tmp_path: Path) -> set[str]:
    """Return every sample name of a real /metrics page: two accounts, one refreshed, one
    failing, so every family (histogram buckets and failure classes too) has samples.
    """
    config = config_with(tmp_path, emulator, "[accounts.a]\n[accounts.b]\n")
    await login(emulator, config, "a")
    await login(emulator, config, "b")
    async with serving(config) as served:
        status, _ = await served.request("POST", "/v1/accounts/a/refresh")
        assert status == 200
        emulator.inject("token", "http503")
        status, _ = await served.request("POST", "/v1/accounts/b/refresh")
        assert status == 502
        status, text = await served.text("/metrics")
    assert status == 200
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def rule_expressions() -> dict[str, str]:
    """Return {alert name: expression} from alerts.yml."""
    document = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in document["groups"] for rule in group["rules"]}


def dashboard_panels(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every panel, including those nested in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in document["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_expressions(document: dict[str, Any]) -> list[str]:
    """Return every PromQL expression: panel targets and template variable queries."""
    expressions = [
        target["expr"]
        for panel in dashboard_panels(document)
        for target in panel.get("targets", [])
    ]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            expressions.append(variable["query"]["query"])
    return expressions


def promtool() -> str:
    """Return promtool's path, or skip (with the reason) when it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt install prometheus, or .ci/check-prometheus)")
    return path


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """`promtool check rules` accepts alerts.yml and `promtool test rules` passes every case
    in alerts.test.yml (each alert fires when it should, with its labels and texts, and a
    healthy daemon fires none).
    """
    tool = promtool()
    checked = subprocess.run(
        [tool, "check", "rules", RULES.name], cwd=RULES.parent, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in checked.stdout
    tested = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_the_alert_rules_cover_what_operators_need_and_each_is_unit_tested() -> None:
    """Refresh-token expiry, failing refreshes, re-login and a down daemon all have rules, and
    every rule appears in the unit tests.
    """
    names = set(rule_expressions())
    assert {
        "KakaoTokendDown",
        "KakaoTokendReloginNeeded",
        "KakaoTokendRefreshFailing",
        "KakaoTokendRefreshTokenExpiring",
        "KakaoTokendRefreshTokenExpiringSoon",
    } <= names
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert names - tested == set()


async def test_the_alert_rules_use_only_metrics_that_exist(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """Every metric an alert rule names is on a real /metrics page (or is Prometheus' up)."""
    names = await scraped_names(emulator, tmp_path)
    used = {m for expr in rule_expressions().values() for m in METRIC_RE.findall(expr)}
    assert {"kakao_tokend_account_health", "up"} <= used
    assert used - names - PROMETHEUS_SERIES == set()


async def test_the_dashboard_is_valid_and_uses_only_metrics_that_exist(
    emulator: KakaoEmulator, tmp_path: Path
) -> None:
    """The dashboard is JSON Grafana can import: unique panel ids, panels inside the 24-column
    grid, a query per target with a unique refId, every panel on the data source variable;
    and every metric it queries is on a real /metrics page (or is Prometheus' up).
    """
    document = json.loads(DASHBOARD.read_text())
    assert document["title"] == "kakao-tokend" and isinstance(document["schemaVersion"], int)
    panels = dashboard_panels(document)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in document["templating"]["list"]}
    assert {"datasource", "job", "instance", "account"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
    names = await scraped_names(emulator, tmp_path)
    used = {m for expr in dashboard_expressions(document) for m in METRIC_RE.findall(expr)}
    assert "kakao_tokend_refresh_duration_seconds_bucket" in used
    assert "process_resident_memory_bytes" in used
    assert used - names - PROMETHEUS_SERIES == set()


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query, with Grafana's variables filled in, parses: promtool checks them as
    recording rules.
    """
    tool = promtool()
    document = json.loads(DASHBOARD.read_text())
    rules = []
    for index, panel in enumerate(dashboard_panels(document)):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"dashboard:panel{index}:{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
