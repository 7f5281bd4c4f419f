"""Grafana dashboard (deploy/grafana/botbox-dashboard.json) against CONTRACT §5 and the live registry.

Every metric the dashboard queries must exist with the labels it uses (a renamed metric would silently
show "No data"), and the dashboard must cover the metrics operators need.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "botbox-dashboard.json"
CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
# Labels Prometheus adds at scrape time / histogram internals, valid on every metric.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "container"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
KEY_METRICS = {
    "botbox_requests_total",
    "botbox_request_duration_seconds",
    "botbox_upstream_errors_total",
    "botbox_active_connections",
    "botbox_connections_rejected_total",
    "botbox_https_interception_cert_issued_total",
}
METRIC_RE = re.compile(r"\bbotbox_[a-z0-9_]+\b")


def _contract_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) parsed from the CONTRACT §5 table."""
    if not CONTRACT.is_file():
        pytest.skip(f"CONTRACT.md not found at {CONTRACT} (checked relative to the repo root)")
    text = CONTRACT.read_text()
    section = text.split("## 5.", 1)[1].split("\n## ", 1)[0]
    out: dict[str, tuple[str, set[str]]] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`(botbox_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|(.*)\|\s*$", line)
        if not m:
            continue
        labels_col = m.group(3)
        while True:  # drop parenthesised value lists, keep the label names
            stripped = re.sub(r"\([^()]*\)", "", labels_col)
            if stripped == labels_col:
                break
            labels_col = stripped
        out[m.group(1)] = (m.group(2), set(re.findall(r"`([a-z_]+)`", labels_col)))
    assert len(out) >= 10, f"could not parse the metrics table in {CONTRACT}"
    return out


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def _exprs(d: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(d) for t in p.get("targets", [])]
    for var in d.get("templating", {}).get("list", []):
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(q.get("query", ""))
        elif isinstance(q, str) and var.get("type") == "query":
            exprs.append(q)
    return exprs


def _base_name(name: str, contract: dict[str, tuple[str, set[str]]]) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and contract.get(base, ("", set()))[0] == "histogram":
            return base
    return name


def _selector_labels(expr: str, metric: str) -> set[str]:
    labels: set[str] = set()
    for m in re.finditer(re.escape(metric) + r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)", m.group(1)))
    return labels


def _grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


def test_dashboard_is_importable_grafana_json() -> None:
    d = _dashboard()
    assert d["uid"] and d["title"]
    assert isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in _panels(d):
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", "panels must use the datasource variable"
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    assert any(v["type"] == "datasource" for v in d["templating"]["list"])


def test_every_dashboard_metric_exists_in_the_contract_with_its_labels() -> None:
    contract = _contract_metrics()
    for expr in _exprs(_dashboard()):
        names = set(METRIC_RE.findall(expr))
        assert names, f"query without a botbox metric: {expr}"
        allowed_labels = set(TARGET_LABELS)
        for name in names:
            base = _base_name(name, contract)
            assert base in contract, f"{name} is not a CONTRACT §5 metric (query: {expr})"
            mtype, labels = contract[base]
            if name.endswith("_bucket"):
                labels = labels | {"le"}
            if base != name:
                assert mtype == "histogram"
            elif mtype == "histogram":
                pytest.fail(f"histogram {name} must be queried via _bucket/_sum/_count: {expr}")
            unknown = _selector_labels(expr, name) - labels - TARGET_LABELS
            assert not unknown, f"{name} has no label(s) {unknown} (query: {expr})"
            allowed_labels |= labels
        unknown_group = _grouping_labels(expr) - allowed_labels
        assert not unknown_group, f"grouping by unknown label(s) {unknown_group}: {expr}"


def test_dashboard_covers_the_key_metrics() -> None:
    contract = _contract_metrics()
    used = {_base_name(n, contract) for e in _exprs(_dashboard()) for n in METRIC_RE.findall(e)}
    assert set(contract) >= KEY_METRICS, "KEY_METRICS drifted from the contract"
    missing = KEY_METRICS - used
    assert not missing, f"dashboard lacks panels for {sorted(missing)}"
    assert set(contract) - used == set(), f"metrics without a panel: {sorted(set(contract) - used)}"


def test_latency_panel_shows_quantiles_from_the_histogram() -> None:
    exprs = _exprs(_dashboard())
    quantiles = {
        m.group(1)
        for e in exprs
        for m in re.finditer(r"histogram_quantile\((0\.\d+),.*?botbox_request_duration_seconds_bucket", e)
    }
    assert {"0.5", "0.9", "0.99"} <= quantiles


def test_dashboard_metric_names_match_the_proxy_registry() -> None:
    """The names the proxy really exports (botbox/metrics.py), with their labels, are the ones queried."""
    metrics_mod = pytest.importorskip("botbox.metrics")
    registry = metrics_mod.Metrics().registry
    exported: dict[str, set[str]] = {}
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        exported[name] = {k for s in family.samples for k in s.labels} - {"le"}
    contract = _contract_metrics()
    used = {_base_name(n, contract) for e in _exprs(_dashboard()) for n in METRIC_RE.findall(e)}
    missing = used - set(exported)
    assert not missing, f"dashboard queries metrics the proxy does not export: {sorted(missing)}"
    for name in used:
        if exported[name]:  # labelled families only show labels once a sample exists
            assert exported[name] <= contract[name][1], name
