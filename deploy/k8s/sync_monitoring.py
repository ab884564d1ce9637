"""Generate deploy/k8s/base/monitoring/ from the docker-compose stack's monitoring files.

The alert rules (deploy/prometheus/alerts.yml) and the Grafana dashboards
(deploy/grafana/dashboards/*.json) have one source each, shared with docker-compose.yml. kustomize
loads no file outside a kustomization's root (and `kubectl apply -k` has no flag to lift that), so
this script writes what Kubernetes needs inside the root:

- ``prometheusrule.yaml``: a PrometheusRule whose ``spec.groups`` are alerts.yml's groups;
- ``dashboards/*.json``: copies of the dashboards;
- ``kustomization.yaml``: both, the dashboards as a ConfigMap labelled ``grafana_dashboard: "1"``
  (the label Grafana's dashboard sidecar watches).

tests/test_deploy_manifests.py fails when these files differ from what this script writes, so
an edit of alerts.yml or of a dashboard is followed by::

    python deploy/k8s/sync_monitoring.py            # rewrite the generated files
    python deploy/k8s/sync_monitoring.py --check    # exit 1 (listing them) if any is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
OUTPUT = ROOT / "deploy" / "k8s" / "base" / "monitoring"

RULE_NAME = "forecaster-alerts"
DASHBOARD_CONFIGMAP = "forecaster-dashboards"
HEADER = ("# GENERATED from {source} by deploy/k8s/sync_monitoring.py:\n"
          "# edit the source, then run `python deploy/k8s/sync_monitoring.py`.\n")


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks, readable in review."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def _dump(document: object) -> str:
    return yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, width=100,
                     allow_unicode=True)


def prometheus_rule(alerts_file: Path = ALERTS) -> str:
    rules = yaml.safe_load(alerts_file.read_text())
    if not isinstance(rules, dict) or not isinstance(rules.get("groups"), list):
        raise ValueError(f"{alerts_file}: expected a Prometheus rule file with `groups:`")
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": RULE_NAME, "labels": {"app.kubernetes.io/name": "forecaster"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER.format(source="deploy/prometheus/alerts.yml") + _dump(resource)


def kustomization(dashboards: list[str]) -> str:
    document: dict[str, object] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["prometheusrule.yaml"],
    }
    if dashboards:
        document["configMapGenerator"] = [{
            "name": DASHBOARD_CONFIGMAP,
            "files": [f"dashboards/{name}" for name in dashboards],
            # a fixed name: Grafana's sidecar finds it by label, and nothing refers to it
            "options": {"disableNameSuffixHash": True, "labels": {"grafana_dashboard": "1"},
                        # the folder, as in deploy/grafana/provisioning (read by a sidecar
                        # configured with folderAnnotation: grafana_folder)
                        "annotations": {"grafana_folder": "Forecaster"}},
        }]
    return HEADER.format(source="deploy/grafana/dashboards/*.json") + _dump(
        document)


def expected_files() -> dict[Path, str]:
    """Every generated file (relative to OUTPUT) and its content."""
    dashboards = sorted(path.name for path in DASHBOARDS.glob("*.json"))
    files = {
        Path("prometheusrule.yaml"): prometheus_rule(),
        Path("kustomization.yaml"): kustomization(dashboards),
    }
    for name in dashboards:
        files[Path("dashboards") / name] = (DASHBOARDS / name).read_text()
    return files


def stale_files(output: Path = OUTPUT) -> list[str]:
    """Generated files that are missing, differ, or are left over; empty when in sync."""
    expected = expected_files()
    stale = [str(path) for path, text in expected.items()
             if not (output / path).is_file() or (output / path).read_text() != text]
    present = {path.relative_to(output) for path in output.rglob("*") if path.is_file()}
    stale += [f"{path} (no longer generated)" for path in sorted(present - set(expected))]
    return stale


def write(output: Path = OUTPUT) -> None:
    expected = expected_files()
    for path, text in expected.items():
        (output / path).parent.mkdir(parents=True, exist_ok=True)
        (output / path).write_text(text)
    for path in output.rglob("*"):
        if path.is_file() and path.relative_to(output) not in expected:
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a generated file is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: deploy/k8s/base/monitoring/{path}", file=sys.stderr)
        return 1 if stale else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
