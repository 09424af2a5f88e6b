"""The Grafana dashboard and the Prometheus rules query only metrics the service exports,
and the rules pass promtool's check and unit tests (skipped where promtool is not installed;
CI installs Debian's prometheus package for it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

# The same whichever database server and auth mode the suite runs with: CI's
# second pass leaves it out (setup.cfg, marker once).
pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pixstream.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
NAME = re.compile(r"\b(pixstream_[a-z0-9_]+)")
# Series Prometheus makes itself, not the service.
PROMETHEUS_OWN = {"up"}


def exported(text: str) -> set[str]:
    """Every series name a /metrics text can carry, from its TYPE lines (labelled
    metrics with no sample yet included): counters as _total, histograms by part."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "counter":
                names |= {name, f"{name}_total"}
            elif kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
    return names


def dashboard_queries() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in document["panels"] for t in panel.get("targets", [])]


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_dashboard_and_rules_query_only_exported_metrics(client):
    names = exported(client.get("/metrics").text)
    assert "pixstream_backlog_messages" in names and "pixstream_ready" in names
    queries = dashboard_queries()
    assert len(queries) >= 12
    for expr in queries + rule_queries():
        used = set(NAME.findall(expr))
        for builtin in PROMETHEUS_OWN:
            if re.search(rf"\b{builtin}\{{", expr):
                used.add(builtin)
        assert used, expr
        assert used - PROMETHEUS_OWN <= names, (expr, used - names)


def test_dashboard_covers_what_operators_watch():
    text = "\n".join(dashboard_queries())
    for metric in ("messages_delivered", "backlog_messages", "oldest_unconfirmed_age_seconds",
                   "wakeup_latency_seconds_bucket", "streams_open", "requests_refused",
                   "long_polls", "waiting_requests", "pool_requests_waiting",
                   "listener_connected", "listener_reconnects", 'status="503"'):  # fmt: skip
        assert metric in text, metric


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool (Debian package 'prometheus')")
def test_promtool_checks_and_unit_tests_the_rules():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"]}  # fmt: skip
    unit_tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert len(unit_tested & alerts) >= 3, unit_tested
