"""Hot swap: follow the registry alias and replace the served model without a restart.

A background thread reads ``name@alias`` every ``poll_seconds``. When it points at a new
version, the thread checks, loads and warms that version up while the old one keeps serving,
then swaps one reference. A request holds the model it was checked against until it is
answered, so requests in flight finish on the old model. A version that fails to load, or that
no race vouched for (``pipelines.signing.Untrusted``: refused before any of its code is
imported), is counted, logged and not tried again until the alias moves; the old model keeps
serving.

**Last known good.** While no model is served, a registry that cannot be read or a version that
fails or is refused makes the watcher serve its ``fallback`` once (the replica's cached last
good model, ``serving.model_cache``), and it goes on following the alias: the registry's
version replaces the cached one as soon as it loads, the same version included.

**Divergence.** After each read of the alias, ``on_divergence`` says whether the served version
(or none) differs from the one the alias names (False while there is no such alias).

**Errors.** ``last_error`` says why no model is served, in words a client may read (/readyz and
503 bodies): no URI, path or credential, and for a failure an ``error_id`` that names the log
line holding the details (whose URIs are logged without their credentials).
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Callable

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from pipelines.signing import Untrusted
from serving.model import ServedModel, load_version, resolve_alias, why_missing

logger = logging.getLogger(__name__)

Loader = Callable[[MlflowClient, ModelVersion, str], ServedModel]
# the user and password of a URI (scheme://user:password@host): MLflow's errors repeat the
# tracking URI as given, credentials included
CREDENTIALS = re.compile(r"(?<=://)[^/\s@]+@")


class WithoutCredentials(logging.Filter):
    """Drops credentials from the URIs of a record's message and traceback: the log says
    which server failed, not how to log in to it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = CREDENTIALS.sub("", record.getMessage()), None
        if record.exc_info:
            record.exc_text = CREDENTIALS.sub("", logging.Formatter().formatException(
                record.exc_info))
            record.exc_info = None
        return True


logger.addFilter(WithoutCredentials())


def new_error_id() -> str:
    """A short id for one failure: the client gets it, the log line with the details has it."""
    return uuid.uuid4().hex[:12]


class ModelWatcher:
    """Holds the served model (``current``) and keeps it on the version of ``name@alias``."""

    def __init__(self, client: MlflowClient, name: str, alias: str, poll_seconds: float,
                 on_outcome: Callable[[str, ServedModel | None], None] | None = None,
                 loader: Loader = load_version,
                 fallback: Callable[[], ServedModel] | None = None,
                 on_refused: Callable[[str], None] | None = None,
                 on_divergence: Callable[[bool], None] | None = None):
        self.client, self.name, self.alias = client, name, alias
        self.poll_seconds = poll_seconds
        self.current: ServedModel | None = None
        self.failed_version: int | None = None
        self.last_error: str | None = None
        self.error_id: str | None = None
        self._on_outcome, self._on_refused = on_outcome, on_refused
        self._on_divergence = on_divergence
        self._loader, self._fallback = loader, fallback
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> str:
        """Read the alias once and act on it: "loaded" (the first model), "swapped",
        "failed", "refused", "unchanged", "missing" (no such model or alias yet) or
        "unreachable" (the registry did not answer). While no model is served, the last
        three but "missing" serve the fallback (once)."""
        try:
            outcome = self._follow_alias()
        except Exception as error:  # noqa: BLE001 - e.g. the tracking server is down
            error_id = new_error_id()
            logger.warning("error %s: could not read %s@%s: %s", error_id, self.name,
                           self.alias, error)
            self._failed("the model registry is unreachable", error_id)
            outcome = "unreachable"
        if self.current is None and outcome in ("failed", "refused", "unreachable"):
            self._serve_fallback()
        return outcome

    def _follow_alias(self) -> str:
        version = resolve_alias(self.client, self.name, self.alias)
        if version is None:
            self.last_error = f"{self.name}@{self.alias} does not exist: " \
                              f"{why_missing(self.client, self.name, self.alias)}"
            self.error_id = None
            self._diverged(False)
            return "missing"
        number = int(version.version)
        try:
            return self._load(version, number)
        finally:
            self._diverged(self.current is None or self.current.version != number)

    def _load(self, version: ModelVersion, number: int) -> str:
        current = self.current
        if (current is not None and current.version == number
                and current.info.source == "registry") or number == self.failed_version:
            return "unchanged"
        kept = f"keeping v{current.version}" if current else "no model is served"
        error_id = new_error_id()
        try:
            model = self._loader(self.client, version, self.alias)
        except Untrusted as error:
            logger.error("error %s: %s v%s refused before loading: %s; %s", error_id,
                         self.name, number, error, kept)
            self.failed_version = number
            self._failed(f"{self.name} v{number} was refused: no race vouched for it as it is",
                         error_id)
            if self._on_refused is not None:
                self._on_refused(error.reason)
            return "refused"
        except Exception:  # noqa: BLE001 - any failure keeps the old model serving
            logger.exception("error %s: %s v%s failed to load; %s", error_id, self.name, number,
                             kept)
            self.failed_version = number
            self._failed(f"loading {self.name} v{number} failed", error_id)
            self._report("failed", current)
            return "failed"
        outcome = "loaded" if current is None else "swapped"
        logger.info("%s v%s %s from the registry (was %s)", self.name, number, outcome,
                    f"v{current.version} from the {current.info.source}" if current else "none")
        self.current, self.failed_version, self.last_error, self.error_id = \
            model, None, None, None
        self._report(outcome, model)
        return outcome

    def _serve_fallback(self) -> None:
        """The fallback, tried once: while it serves, the alias is still followed."""
        fallback, self._fallback = self._fallback, None
        if fallback is None:
            return
        error_id = new_error_id()
        try:
            model = fallback()
        except LookupError as error:
            logger.warning("no last good model to serve instead: %s", error)
            return
        except Untrusted as error:
            logger.error("error %s: the last good model was refused: %s", error_id, error)
            if self._on_refused is not None:
                self._on_refused(error.reason)
            return
        except Exception:  # noqa: BLE001 - nothing to serve, as without a cache
            logger.exception("error %s: the last good model failed to load", error_id)
            return
        logger.warning("serving %s v%s, the last good model, from the cache: %s", self.name,
                       model.version, self.last_error)
        self.current, self.last_error, self.error_id = model, None, None
        self._report("loaded", model)

    def _failed(self, message: str, error_id: str) -> None:
        self.last_error, self.error_id = f"{message} (error id {error_id})", error_id

    def _diverged(self, diverged: bool) -> None:
        if self._on_divergence is not None:
            self._on_divergence(diverged)

    def _report(self, outcome: str, model: ServedModel | None) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome, model)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bug must not stop the watching
                logger.exception("following %s@%s failed", self.name, self.alias)
            self._stop.wait(self.poll_seconds)


class PinnedModel:
    """The watcher's interface over one model that never changes (an exported Bento's)."""

    def __init__(self, load: Callable[[], ServedModel],
                 on_outcome: Callable[[str, ServedModel | None], None] | None = None):
        self.current: ServedModel | None = None
        self.last_error: str | None = None
        self.error_id: str | None = None
        self._load, self._on_outcome = load, on_outcome

    def start(self) -> None:
        try:
            self.current = self._load()
            outcome = "loaded"
        except Exception:
            self.error_id = new_error_id()
            logger.exception("error %s: the pinned model failed to load", self.error_id)
            self.last_error = f"loading the pinned model failed (error id {self.error_id})"
            outcome = "failed"
        if self._on_outcome is not None:
            self._on_outcome(outcome, self.current)

    def stop(self) -> None:
        """Nothing runs in the background."""
