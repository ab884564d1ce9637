"""Static checks of the monitoring config under deploy/: the Prometheus config and alert rules
(promtool check and promtool's rule unit tests), the Grafana provisioning and dashboard, and
that every metric they query is one the service, the trainer, BentoML or Prometheus exports.

promtool comes from Debian's ``prometheus`` package, which .ci/run installs; without it the
``promtool`` fixture fails (never skips) with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring_support import require_binaries

REPO = Path(__file__).parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERT_RULES = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
DASHBOARD = DASHBOARDS_DIR / "forecaster.json"
# where docker-compose mounts DASHBOARDS_DIR in the Grafana container
GRAFANA_DASHBOARDS_PATH = "/var/lib/grafana/dashboards"
DATASOURCE_UID = "prometheus"

PROMTOOL_TIMEOUT_S = 120

# --- the metrics that exist: metric family -> type ----------------------------------------------
# Counters are named as exposed (with _total); histograms and summaries by their family name,
# expanded below to the _bucket/_sum/_count samples queries use.

# the BentoML service (serving/), a fixed contract
SERVING_METRICS = {
    "forecaster_series_forecast_total": "counter",  # {model_version}
    "forecaster_inference_batch_size": "histogram",  # series per model forward pass
    "forecaster_forward_seconds": "histogram",
    "forecaster_validation_failures_total": "counter",  # {reason}
    "forecaster_model_loads_total": "counter",  # {outcome}: loaded|swapped|failed
    "forecaster_model_refusals_total": "counter",  # {reason}: see serving/metrics.py
    "forecaster_served_model_version": "gauge",  # {model_name, alias}
    "forecaster_served_from_cache": "gauge",
    "forecaster_registry_divergence": "gauge",
    # live accuracy (POST /actuals); labels model_name, model_version, horizon (a
    # forecast_store.HORIZON_BUCKETS value), and level for the interval counters
    "forecaster_live_abs_error_total": "counter",
    "forecaster_live_scaled_error_total": "counter",
    "forecaster_live_smape_total": "counter",
    "forecaster_live_points_total": "counter",
    "forecaster_live_scaled_points_total": "counter",  # points with a scale: MASE's count
    "forecaster_live_interval_hits_total": "counter",
    "forecaster_live_interval_points_total": "counter",
    "forecaster_actuals_received_total": "counter",
    "forecaster_actuals_matched_total": "counter",
    "forecaster_forecast_log_dropped_total": "counter",  # {reason}: queue_full|store_unavailable
    "forecaster_backtest_mase": "gauge",  # {model_name, model_version}: the served version's
    "forecaster_accuracy_alert_factor": "gauge",  # ForecastAccuracyDegraded's thresholds
    "forecaster_accuracy_alert_min_points": "gauge",
}

# `forecaster schedule` (pipelines/schedule.py), on its /metrics and through the Pushgateway
TRAINER_METRICS = {
    "forecaster_training_runs_total": "counter",  # {outcome}: success|failure
    "forecaster_training_skipped_runs_total": "counter",
    "forecaster_training_last_success_timestamp_seconds": "gauge",
    "forecaster_training_last_failure_timestamp_seconds": "gauge",
    "forecaster_training_last_run_duration_seconds": "gauge",
    "forecaster_champion_score": "gauge",
    "forecaster_champion_version": "gauge",
    "forecaster_training_retrain_requests_total": "counter",  # {outcome}: POST /retrain
}

# BentoML 1.4's built-ins for a @bentoml.service: RunnerTrafficMetricsMiddleware
# (bentoml/_internal/server/http/instruments.py) and the adaptive batching histogram
# (_bentoml_impl/server/app.py), under the metrics namespace "bentoml_service" (config
# services.metrics.namespace; not the service name). Labels: endpoint, http_response_code,
# service_name, service_version, runner_name (= the service name, "forecaster"); the batch
# histogram has method_name and worker_index instead of endpoint and http_response_code.
BENTOML_NAMESPACE = "bentoml_service"
BENTOML_METRICS = {
    f"{BENTOML_NAMESPACE}_{name}": kind for name, kind in {
        "request_total": "counter",
        "request_duration_seconds": "histogram",
        "request_in_progress": "gauge",
        "last_request_timestamp_seconds": "gauge",
        "websocket_connections": "gauge",
        "websocket_data_received": "summary",
        "websocket_data_sent": "summary",
        "adaptive_batch_size": "histogram",
    }.items()
}

# made by Prometheus itself
PROMETHEUS_METRICS = {"up": "gauge", "ALERTS": "gauge", "ALERTS_FOR_STATE": "gauge"}

SAMPLE_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def sample_names(families: dict[str, str]) -> set[str]:
    """The sample names a query can select, e.g. a histogram's ``_bucket``, ``_sum``, ``_count``."""
    return {name + suffix for name, kind in families.items()
            for suffix in SAMPLE_SUFFIXES.get(kind, ("",))}


KNOWN_METRICS = sample_names(
    {**SERVING_METRICS, **TRAINER_METRICS, **BENTOML_METRICS, **PROMETHEUS_METRICS})

# --- PromQL: the metric names in an expression --------------------------------------------------

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "offset", "bool", "inf", "nan"}
# Grafana's variables, replaced by something PromQL parses
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression: identifiers that are not functions,
    aggregations, keywords, label names or durations. A regex, not a parser: enough for the
    expressions in deploy/, and checked on samples in test_metric_names_extraction."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery windows (5m, $__range, 1h:5m)
    # label lists of by (...), without (...), on (...), group_left (...)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    # not after a word character, ":", "." or "$": skips the unit of 15m, 1e3, $variables
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def test_metric_names_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(x_bucket{endpoint="/forecast"}[5m])))'
    ) == {"x_bucket"}
    assert metric_names('sum(rate(a{code=~"5.."}[$__rate_interval])) / sum(rate(b[1m])) > 0.01'
                        ) == {"a", "b"}
    assert metric_names("time() - max without (instance, job) (g > 0) > 26 * 3600") == {"g"}
    assert metric_names('increase(c{o="failed"}[15m]) > 0 or (c > 0 unless c offset 15m)'
                        ) == {"c"}
    assert metric_names('up{job="x"} == 0 or absent(up{job="x"})') == {"up"}
    assert metric_names("absent_over_time((g > 0)[26h:5m]) and on (job) ALERTS") == {
        "g", "ALERTS"}


# --- promtool ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool; a failure with the install hint when missing, never a skip."""
    return require_binaries({"promtool": "prometheus"})["promtool"]


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True,
                            cwd=PROMETHEUS_DIR, timeout=PROMTOOL_TIMEOUT_S)
    assert result.returncode == 0, (
        f"promtool {' '.join(map(str, args))} exited with {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}")
    return result


# --- helpers ----------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    with open(path) as file:
        return yaml.safe_load(file)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERT_RULES)["groups"] for rule in group["rules"]
            if "alert" in rule]


def dashboard() -> dict[str, Any]:
    with open(DASHBOARD) as file:
        return json.load(file)


def query_panels() -> list[dict[str, Any]]:
    """The dashboard's panels that show data (rows are only headings), nested rows included."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.extend(panel.get("panels", []))
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in query_panels() for target in panel.get("targets", [])
            if target.get("expr")]


# --- Prometheus -------------------------------------------------------------------------------


def test_prometheus_config_is_valid(promtool: str) -> None:
    # also loads and checks rule_files, resolved relative to the config file
    result = run_promtool(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert "1 rule files found" in result.stdout + result.stderr


def test_prometheus_config_scrapes_the_stack() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    interval = config["global"]["scrape_interval"]
    assert re.fullmatch(r"\d+s", interval) and 5 <= int(interval[:-1]) <= 15, interval
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # plain host:port strings, one per job: the e2e test rewrites them textually
    targets = {name: [target for static in job["static_configs"] for target in static["targets"]]
               for name, job in jobs.items()}
    assert targets == {
        "forecaster-service": ["service:3000"],
        "forecaster-trainer": ["trainer:9101"],
        "pushgateway": ["pushgateway:9091"],
        "prometheus": ["localhost:9090"],
    }
    for name in ("forecaster-service", "forecaster-trainer"):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    # the pushed job="forecaster_training" label must survive the scrape
    assert jobs["pushgateway"]["honor_labels"] is True
    assert not jobs["forecaster-service"].get("honor_labels", False)
    # the alerts go to the Alertmanager (deploy/alertmanager: the drift alert retrains)
    assert [target for manager in config["alerting"]["alertmanagers"]
            for static in manager["static_configs"] for target in static["targets"]] == [
        "alertmanager:9093"]
    # every target appears once in the text, so that replacing it rewrites exactly that target
    text = PROMETHEUS_CONFIG.read_text()
    for name in ("service:3000", "trainer:9101", "pushgateway:9091", "alertmanager:9093"):
        assert text.count(name) == 1, name


def test_alert_rules_are_valid(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", ALERT_RULES)


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERT_TESTS)
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == {
        "ForecastServiceDown", "ForecastLatencyP99High", "ForecastErrorRatioHigh",
        "RetrainingStale", "ModelLoadFailures", "ForecastAccuracyDegraded"}
    assert {group["name"] for group in load_yaml(ALERT_RULES)["groups"]} == {"forecaster"}
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


def test_every_alert_rule_fires_in_a_unit_test() -> None:
    """Each rule (not only each alert name: RetrainingStale has two) is matched by an expected
    firing alert with its name and its labels in alerts_test.yml."""
    tests = load_yaml(ALERT_TESTS)
    assert tests["rule_files"] == [ALERT_RULES.name]
    expected = [(case["alertname"], alert.get("exp_labels", {}))
                for test in tests["tests"] for case in test.get("alert_rule_test", [])
                for alert in case.get("exp_alerts", [])]
    for rule in alert_rules():
        assert any(name == rule["alert"] and rule["labels"].items() <= labels.items()
                   for name, labels in expected), (
            f"no unit test in {ALERT_TESTS.name} expects {rule['alert']} {rule['labels']} "
            "to fire")
    # and the unit tests check annotations too, not only that something fires
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            for alert in case.get("exp_alerts", []):
                assert set(alert["exp_annotations"]) == {"summary", "description"}, case
    # a case where nothing fires, for every alert
    quiet = {case["alertname"] for test in tests["tests"]
             for case in test.get("alert_rule_test", []) if not case.get("exp_alerts")}
    assert quiet >= {rule["alert"] for rule in alert_rules()}


def test_alert_exprs_use_known_metrics() -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= KNOWN_METRICS, (rule["alert"], names - KNOWN_METRICS)


# --- Grafana ----------------------------------------------------------------------------------


def test_dashboard_panels_have_queries() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    panels = query_panels()
    assert len(panels) >= 10
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, panel
        assert any(target.get("expr", "").strip() for target in panel.get("targets", [])), (
            f"panel {panel['title']!r} has no query")
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_exprs_use_known_metrics() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        assert names <= KNOWN_METRICS, (expr, names - KNOWN_METRICS)
        used |= names
    # every metric of ours is on the dashboard (a histogram through any of its samples)
    for family, kind in {**SERVING_METRICS, **TRAINER_METRICS}.items():
        assert sample_names({family: kind}) & used, f"{family} is on no dashboard panel"
    assert "ALERTS" in used
    assert {"bentoml_service_request_total", "bentoml_service_request_duration_seconds_bucket",
            "bentoml_service_adaptive_batch_size_bucket"} <= used


def test_dashboard_exprs_parse(promtool: str, tmp_path: Path) -> None:
    """promtool has no bare PromQL check: the dashboard's queries go through `check rules` as
    recording rules, with Grafana's $__variables replaced."""
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", path)


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uids = set()
    for panel in query_panels():
        uids.add(panel["datasource"]["uid"])
        uids.update(target["datasource"]["uid"] for target in panel["targets"]
                    if "datasource" in target)
    assert uids == {DATASOURCE_UID}

    datasources = load_yaml(DATASOURCES)
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["name"] == "Prometheus"
    assert source["type"] == "prometheus"
    assert source["uid"] == DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True


def test_dashboard_provider_reads_the_dashboards_folder() -> None:
    providers = load_yaml(DASHBOARD_PROVIDERS)
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == GRAFANA_DASHBOARDS_PATH
    # the folder mounted there holds the dashboard, and nothing else that Grafana would load
    assert sorted(path.name for path in DASHBOARDS_DIR.glob("*.json")) == [DASHBOARD.name]


# --- BentoML ------------------------------------------------------------------------------------


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (bentoml is slow to)
    assert spec is not None and spec.origin, f"{package} is not installed"
    return Path(spec.origin).parent / relative


def test_bentoml_metric_names_match_the_installed_bentoml() -> None:
    """BENTOML_METRICS is data; this checks it against the installed BentoML's source, so that
    an upgrade that renames a metric fails here rather than on a silent dashboard."""
    instruments = _package_file(
        "bentoml", "_internal/server/http/instruments.py").read_text()
    runner_middleware = instruments[instruments.index("class RunnerTrafficMetricsMiddleware"):]
    app = _package_file("_bentoml_impl", "server/app.py").read_text()
    defaults = load_yaml(_package_file(
        "bentoml", "_internal/configuration/v2/default_configuration.yaml"))
    assert defaults["services"]["metrics"]["namespace"] == BENTOML_NAMESPACE
    # a @bentoml.service app takes its traffic middleware's namespace from that config
    assert "RunnerTrafficMetricsMiddleware" in app
    assert "api_server_config.metrics.namespace" in app
    assert f'namespace="{BENTOML_NAMESPACE}"' in app and 'name="adaptive_batch_size"' in app
    source_kinds = {"Counter": "counter", "Histogram": "histogram", "Gauge": "gauge",
                    "Summary": "summary"}
    found = {
        f"{BENTOML_NAMESPACE}_{name}" + ("_total" if source_kinds[kind] == "counter" else ""):
            source_kinds[kind]
        for kind, name in re.findall(
            r"metrics_client\.(\w+)\(\s*namespace=self\.namespace,\s*name=\"(\w+)\"",
            runner_middleware)
    }
    found[f"{BENTOML_NAMESPACE}_adaptive_batch_size"] = "histogram"
    # BentoML names its counter "request_total"; prometheus_client keeps the single _total
    found = {name.replace("_total_total", "_total"): kind for name, kind in found.items()}
    assert found == BENTOML_METRICS


def test_trainer_metrics_are_what_the_scheduler_exports() -> None:
    from pipelines.schedule import TrainingMetrics

    exported = {family.name + ("_total" if family.type == "counter" else ""): family.type
                for family in TrainingMetrics.create().registry.collect()}
    assert exported == TRAINER_METRICS
