"""What a race vouches for, and the check before anything loads a registered model.

Loading a registered version runs its code: MLflow executes the model's Python file ("models
from code"), and a baseline's estimator is a cloudpickle. Whoever can write to the registry can
register a version and move an alias, so nothing loads a version until its files are checked
against what the race recorded:

* registering a version, the race records the SHA-256 of its files' manifest (every file's
  path and SHA-256) as the tag :data:`TAG_FILES`, computed over the files it downloaded back,
  checked and loaded itself;
* once the race is complete, it vouches for each of its versions with the tag
  :data:`TAG_SIGNATURE`, an HMAC-SHA256 keyed by ``$FORECASTER_SIGNING_KEY`` over the model
  name, the version, that digest and the claims ``valid`` and ``race_complete``, and then
  writes ``race_complete=true`` (:func:`vouch`);
* a loader (the service, ``forecaster export-bento``) checks the tags before it downloads
  anything, downloads the files into a directory of its own, checks the digest and, with a
  key, the signature (:func:`verify`), and only then loads the model from that directory.

Without a key the digest is still checked: files changed after the race, and versions
registered without the race's tags, are refused. But anyone who can write tags can write a
matching digest, so such loads are unsigned, and the loaders log that they are.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import mlflow

from pipelines.registry import TAG_COMPLETE, TAG_VALID

KEY_VARIABLE = "FORECASTER_SIGNING_KEY"
TAG_FILES = "files_sha256"  # SHA-256 of the manifest of the version's files
TAG_SIGNATURE = "signature"  # HMAC-SHA256 of the version's claims; empty when unsigned
# written by MLflow into a model's folder whenever it is downloaded through a models:/ URI,
# into the store itself for a local one: registry metadata, never read when a model loads
DOWNLOAD_MARKER = "registered_model_meta"
UNSIGNED_NOTE = (f"model loads are unsigned ({KEY_VARIABLE} is not set): a version's files are "
                 "checked against the digest its race recorded, which anyone who can write "
                 "registry tags could forge")


class Untrusted(ValueError):
    """A version the race did not vouch for, or whose files differ from what it vouched for.
    ``reason`` is a short label for metrics: incomplete, invalid, no_digest, files, unsigned,
    signature."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def signing_key() -> bytes | None:
    """The key shared by the trainer and the service; None when unset or empty."""
    key = os.environ.get(KEY_VARIABLE, "")
    return key.encode() if key else None


def file_manifest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (relative POSIX path) -> its SHA-256, but MLflow's
    download marker (:data:`DOWNLOAD_MARKER`). A link or any other non-regular entry is
    refused: it could point anywhere."""
    manifest = {}
    for path in sorted(Path(directory).rglob("*")):
        mode = path.lstat().st_mode
        relative = path.relative_to(directory).as_posix()
        if stat.S_ISDIR(mode) or relative == DOWNLOAD_MARKER:
            continue
        if not stat.S_ISREG(mode):
            raise Untrusted("files", f"the model's files include {relative!r}, which is not a "
                                     "regular file")
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        manifest[relative] = digest.hexdigest()
    return manifest


def files_digest(directory: Path) -> str:
    """The SHA-256 of the canonical JSON of :func:`file_manifest`: one value names them all."""
    canonical = json.dumps(file_manifest(directory), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _claims(name: str, version: int | str, files: str, valid: str) -> bytes:
    return json.dumps({"name": name, "version": int(version), TAG_FILES: files,
                       TAG_VALID: valid, TAG_COMPLETE: "true"},
                      sort_keys=True, separators=(",", ":")).encode()


def signature(key: bytes | None, name: str, version: int | str, files: str, valid: str) -> str:
    """The HMAC-SHA256 (hex) of a complete version's claims; empty without a key."""
    if key is None:
        return ""
    return hmac.new(key, _claims(name, version, files, valid), hashlib.sha256).hexdigest()


def vouch(name: str, version: int | str, tags: Mapping[str, str], key: bytes | None
          ) -> dict[str, str]:
    """The tags that vouch for a version of a completed race, in the order to write them:
    the signature over its recorded digest and validity, then ``race_complete=true``."""
    return {TAG_SIGNATURE: signature(key, name, version, tags.get(TAG_FILES, ""),
                                     tags.get(TAG_VALID, "")),
            TAG_COMPLETE: "true"}


def check_claims(name: str, version: int | str, tags: Mapping[str, str]) -> None:
    """Refuse (Untrusted) a version whose tags do not claim a complete race's valid model with
    a recorded digest: checked before anything is downloaded."""
    label = f"{name} v{version}"
    if tags.get(TAG_COMPLETE) != "true":
        raise Untrusted("incomplete", f"{label} lacks the tag {TAG_COMPLETE}=true: no "
                                      "completed race vouched for it")
    if tags.get(TAG_VALID) != "true":
        raise Untrusted("invalid", f"{label} is not tagged {TAG_VALID}=true: its race found "
                                   "problems with it")
    if not tags.get(TAG_FILES):
        raise Untrusted("no_digest", f"{label} has no tag {TAG_FILES}: no race recorded its "
                                     "files")


def verify(directory: Path, name: str, version: int | str, tags: Mapping[str, str],
           key: bytes | None) -> None:
    """Refuse (Untrusted) the files in ``directory`` as ``name`` v``version`` unless the tags
    claim a complete valid version, the files match its digest and, with a key, the signature
    matches. Nothing in the directory is imported here."""
    check_claims(name, version, tags)
    label = f"{name} v{version}"
    files = files_digest(directory)
    if not hmac.compare_digest(files, tags[TAG_FILES]):
        raise Untrusted("files", f"{label}: its files do not match the digest its race "
                                 f"recorded ({TAG_FILES})")
    if key is None:
        return
    recorded = tags.get(TAG_SIGNATURE, "")
    if not recorded:
        raise Untrusted("unsigned", f"{label} is not signed, and {KEY_VARIABLE} is set")
    if not hmac.compare_digest(signature(key, name, version, files, tags[TAG_VALID]),
                               recorded):
        raise Untrusted("signature", f"{label}: its signature does not match "
                                     f"({KEY_VARIABLE} differs, or its tags were forged)")


def download(artifact_uri: str, destination: Path, tracking_uri: str | None = None) -> Path:
    """The model's files from its artifact location (``MlflowClient
    .get_model_version_download_uri``, or a logged model's ``artifact_location``), into
    ``destination``; returns their folder. ``tracking_uri``: the server of an
    ``mlflow-artifacts:`` location (default: MLflow's current one). Not through a ``models:/``
    URI, whose download adds a file of its own (:data:`DOWNLOAD_MARKER`)."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri,
                                                    dst_path=str(destination),
                                                    tracking_uri=tracking_uri))
