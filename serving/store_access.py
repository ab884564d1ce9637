"""The worker's forecast store (pipelines.forecast_store), opened on first use: a database that
is down when the service starts, or while it runs, makes the log drop rows and /actuals answer
503 until it is back, without a restart of the service."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pipelines.forecast_store import ForecastStore, StoreUnavailable

logger = logging.getLogger(__name__)


class StoreAccess:
    """The store at ``url``, opened (and migrated) by ``opener`` at the first :meth:`get` that
    finds it reachable; the engine's pool reconnects after an outage."""

    def __init__(self, url: str, opener: Callable[[str], ForecastStore] = ForecastStore.open):
        self.url, self._opener = url, opener
        self._store: ForecastStore | None = None
        self._lock = threading.Lock()

    def get(self) -> ForecastStore:
        """The open store; StoreUnavailable while the database cannot be reached (a URL that
        names no usable database is a ValueError)."""
        store = self._store
        if store is None:
            with self._lock:  # one opening (and migration) per worker at a time
                if self._store is None:
                    self._store = self._opener(self.url)
                store = self._store
        return store

    def try_open(self) -> None:
        """Open the store now, when the service starts; a database that does not answer is
        reported and tried again at the next use."""
        try:
            self.get()
        except StoreUnavailable as error:
            logger.warning("%s; the forecast log and /actuals wait for it", error)

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
