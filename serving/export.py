"""``forecaster export-bento``: an immutable deployment of today's champion.

The champion's MLflow model, checked as the service checks it (``pipelines.signing``: a
version no race vouched for is refused), goes into the BentoML model store (with its registry
coordinates as metadata), and a Bento is built whose service serves that stored model instead
of following the registry alias: the Bento's sources carry its tag
(``serving.config.PINNED_MODEL_FILE``), and its image sets ``FORECASTER_BENTO_MODEL`` too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import bentoml
import mlflow
from bentoml._internal.bento.build_config import BentoEnvSchema  # the type build() takes
from mlflow import MlflowClient

from pipelines import signing
from serving.config import PINNED_MODEL_FILE, load_serving_config
from serving.model import VersionMeta, resolve_alias

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("forecaster", "pipelines", "serving")
BENTO_MODEL_VARIABLE = "FORECASTER_BENTO_MODEL"


def export_bento(name: str | None = None, alias: str | None = None,
                 tracking_uri: str | None = None) -> str:
    """Import ``name@alias`` into the BentoML model store, build a Bento pinning it, and
    return a summary naming both tags."""
    config = load_serving_config()
    name, alias = name or config.model_name, alias or config.model_alias
    uri = tracking_uri or config.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(config.registry_uri or uri)
    client = MlflowClient()
    version = resolve_alias(client, name, alias)
    if version is None:
        raise ValueError(f"{name}@{alias} does not exist in the registry at {uri}")
    meta = VersionMeta.of(client, version)
    # the files the race vouched for, checked before they enter the model store, from which
    # the Bento loads them: the same check as the service's (pipelines.signing)
    signing.check_claims(name, version.version, meta.tags)
    with tempfile.TemporaryDirectory(prefix="forecaster-export-") as download:
        files = signing.download(client.get_model_version_download_uri(name, version.version),
                                 Path(download), client.tracking_uri)
        signing.verify(files, name, version.version, meta.tags, signing.signing_key())
        model = bentoml.mlflow.import_model(
            _bento_name(name), str(files),
            labels={"registered_model": name, "version": str(version.version),
                    "alias": alias},
            metadata={**meta.to_json(), "alias": alias})
    with tempfile.TemporaryDirectory() as build_dir:
        # a build context of its own: the sources plus the file naming the pinned model
        context = Path(build_dir)
        for package in SOURCES:
            shutil.copytree(PROJECT_ROOT / package, context / package,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for filename in ("pyproject.toml", "constraints.txt"):
            shutil.copy(PROJECT_ROOT / filename, context / filename)
        (context / PINNED_MODEL_FILE.name).write_text(str(model.tag))
        bento = bentoml.bentos.build(
            "serving.service:Forecaster",
            name=_bento_name(name),
            labels={"registered_model": name, "version": str(version.version)},
            include=[f"{package}/**/*.py" for package in SOURCES]
            + ["pyproject.toml", "constraints.txt", PINNED_MODEL_FILE.name],
            python={"requirements_txt": "constraints.txt"},
            envs=[BentoEnvSchema(name=BENTO_MODEL_VARIABLE, value=str(model.tag))],
            models=[str(model.tag)],
            build_ctx=str(context),
        )
    return (f"model {model.tag} (from {name} v{version.version}, @{alias})\n"
            f"bento {bento.tag}: serve it with `bentoml serve {bento.tag}`, "
            f"or build an image with `bentoml containerize {bento.tag}`")


def _bento_name(name: str) -> str:
    # BentoML tags allow lowercase letters, digits, "-", "_" and "."
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower())
