"""Hot swap: follow the registry alias and replace the served model without a restart.

A background thread reads ``name@alias`` every ``poll_seconds``. When it points at a new
version, the thread loads, checks and warms that version up while the old one keeps serving,
then swaps one reference. A request holds the model it was checked against until it is
answered, so requests in flight finish on the old model. A version that fails to load is
counted, logged and not tried again until the alias moves; the old model keeps serving.
``last_error`` says why no model is served (no such model, no such alias, the load's error):
/readyz answers it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from serving.model import ServedModel, load_version, resolve_alias, why_missing

logger = logging.getLogger(__name__)

Loader = Callable[[MlflowClient, ModelVersion, str], ServedModel]


class ModelWatcher:
    """Holds the served model (``current``) and keeps it on the version of ``name@alias``."""

    def __init__(self, client: MlflowClient, name: str, alias: str, poll_seconds: float,
                 on_outcome: Callable[[str, ServedModel | None], None] | None = None,
                 loader: Loader = load_version):
        self.client, self.name, self.alias = client, name, alias
        self.poll_seconds = poll_seconds
        self.current: ServedModel | None = None
        self.failed_version: int | None = None
        self.last_error: str | None = None
        self._on_outcome = on_outcome
        self._loader = loader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> str:
        """Read the alias once and act on it: "loaded" (the first model), "swapped",
        "failed", "unchanged" or "missing" (no such model or alias yet)."""
        version = resolve_alias(self.client, self.name, self.alias)
        if version is None:
            self.last_error = f"{self.name}@{self.alias} does not exist: " \
                              f"{why_missing(self.client, self.name, self.alias)}"
            return "missing"
        number = int(version.version)
        if (self.current is not None and self.current.version == number) \
                or number == self.failed_version:
            return "unchanged"
        try:
            model = self._loader(self.client, version, self.alias)
        except Exception as error:  # noqa: BLE001 - any failure keeps the old model serving
            kept = f"keeping v{self.current.version}" if self.current else "no model is served"
            logger.exception("%s v%s failed to load; %s", self.name, number, kept)
            self.failed_version = number
            self.last_error = f"loading {self.name} v{number} failed: {error}"
            self._report("failed", self.current)
            return "failed"
        outcome = "loaded" if self.current is None else "swapped"
        logger.info("%s v%s %s (was %s)", self.name, number, outcome,
                    f"v{self.current.version}" if self.current else "none")
        self.current, self.failed_version, self.last_error = model, None, None
        self._report(outcome, model)
        return outcome

    def _report(self, outcome: str, model: ServedModel | None) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome, model)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - e.g. the tracking server is down
                self.last_error = f"registry unreachable: {error}"
                logger.warning("could not read %s@%s: %s", self.name, self.alias, error)
            self._stop.wait(self.poll_seconds)


class PinnedModel:
    """The watcher's interface over one model that never changes (an exported Bento's)."""

    def __init__(self, load: Callable[[], ServedModel],
                 on_outcome: Callable[[str, ServedModel | None], None] | None = None):
        self.current: ServedModel | None = None
        self.last_error: str | None = None
        self._load, self._on_outcome = load, on_outcome

    def start(self) -> None:
        try:
            self.current = self._load()
            outcome = "loaded"
        except Exception as error:
            logger.exception("the pinned model failed to load")
            self.last_error, outcome = f"loading the pinned model failed: {error}", "failed"
        if self._on_outcome is not None:
            self._on_outcome(outcome, self.current)

    def stop(self) -> None:
        """Nothing runs in the background."""
