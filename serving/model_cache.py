"""The last known good model of a replica, on local disk.

Each registry version the service loads is downloaded into a staging folder inside the cache
directory, checked (:mod:`pipelines.signing`), loaded from there, and, once it has passed its
check and warm-up, kept as the slot's last good model; a download that fails any step is
deleted. A replica that starts while the registry is unreachable, or while its version fails to
load, serves the kept model instead (checked again, against the tags it was kept with).

Layout, one slot per served ``name@alias``::

    CACHE_DIR/.staging/TMP/...             downloads in progress (deleted when done)
    CACHE_DIR/NAME@ALIAS/vN/files/...      the model's files, as the race hashed them
    CACHE_DIR/NAME@ALIAS/vN/version.json   its registry coordinates and tags
    CACHE_DIR/NAME@ALIAS/last              "vN": the last kept version

Every step is a rename on one filesystem, so workers of one replica that keep the same version
at once, or a replica killed halfway, leave either the old entry or the new one. The previous
entry stays until the next one is kept, in case a worker is loading it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILES, META, LAST, STAGING = "files", "version.json", "last", ".staging"


class ModelCache:
    """The cache directory's slot for the model served as ``name@alias``."""

    def __init__(self, root: Path, name: str, alias: str):
        self.root = Path(root)
        # registry names may hold any character; the slot's folder name must not
        self.slot = self.root / "".join(c if c.isalnum() or c in "-_.@" else "-"
                                        for c in f"{name}@{alias}")

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A new empty folder to download into, on the cache's filesystem; deleted at exit
        with whatever :meth:`keep` did not take."""
        parent = self.root / STAGING
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=parent))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def keep(self, files: Path, meta: dict[str, Any]) -> None:
        """Keep ``files`` (a folder from :meth:`staging`, moved, not copied) as version
        ``meta["version"]``, described by ``meta``, and make it the last good model."""
        self.slot.mkdir(parents=True, exist_ok=True)
        entry = self.slot / f"v{int(meta['version'])}"
        if not entry.is_dir():
            incoming = Path(tempfile.mkdtemp(dir=self.slot, prefix=".incoming-"))
            os.rename(files, incoming / FILES)
            (incoming / META).write_text(json.dumps(meta))
            try:
                os.rename(incoming, entry)
            except OSError:  # another worker kept this version first
                shutil.rmtree(incoming, ignore_errors=True)
        last = self.slot / LAST
        previous = last.read_text().strip() if last.is_file() else None
        pointer = self.slot / f".last-{os.getpid()}"
        pointer.write_text(entry.name)
        os.replace(pointer, last)
        for old in self.slot.glob("v*"):
            if old.name not in (entry.name, previous):
                shutil.rmtree(old, ignore_errors=True)
        logger.info("kept %s as the last good model in %s", entry.name, self.slot)

    def last(self) -> tuple[Path, dict[str, Any]] | None:
        """The last good model's files and description; None when none was kept."""
        last = self.slot / LAST
        if not last.is_file():
            return None
        entry = self.slot / last.read_text().strip()
        try:
            meta = json.loads((entry / META).read_text())
        except (OSError, ValueError):
            return None
        return entry / FILES, meta
