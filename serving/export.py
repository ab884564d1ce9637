"""``forecaster export-bento``: an immutable deployment of today's champion.

The champion's MLflow model goes into the BentoML model store (with its registry coordinates
as metadata), and a Bento is built whose service serves that stored model
(``FORECASTER_BENTO_MODEL``) instead of following the registry alias.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
import mlflow
from mlflow import MlflowClient

from serving.config import load_serving_config
from serving.model import VersionMeta, resolve_alias

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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
    model = bentoml.mlflow.import_model(
        _bento_name(name), f"models:/{name}/{version.version}",
        labels={"registered_model": name, "version": str(version.version), "alias": alias},
        metadata={"name": meta.name, "version": meta.version, "alias": alias,
                  "tags": meta.tags, "run_id": meta.run_id,
                  "trained_at": meta.trained_at.isoformat() if meta.trained_at else None})
    bento = bentoml.bentos.build(
        "serving.service:Forecaster",
        name=_bento_name(name),
        labels={"registered_model": name, "version": str(version.version)},
        include=["serving/**/*.py", "pipelines/**/*.py", "forecaster/**/*.py",
                 "pyproject.toml", "constraints.txt"],
        python={"requirements_txt": "constraints.txt"},
        envs=[{"name": BENTO_MODEL_VARIABLE, "value": str(model.tag)}],
        models=[str(model.tag)],
        build_ctx=str(PROJECT_ROOT),
    )
    return (f"model {model.tag} (from {name} v{version.version}, @{alias})\n"
            f"bento {bento.tag}: serve it with `bentoml serve {bento.tag}`, "
            f"or build an image with `bentoml containerize {bento.tag}`")


def _bento_name(name: str) -> str:
    # BentoML tags allow lowercase letters, digits, "-", "_" and "."
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower())
