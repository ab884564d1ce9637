"""The packages' layering, forecaster/ <- pipelines/ <- serving/ <- cli/, checked in a fresh
interpreter through ``sys.modules``: importing a lower layer's modules imports nothing above
it, and the service's configuration does not drag in torch. Lazy imports inside functions are
not seen here; what importing the modules does is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_TIMEOUT_S = 300
WALK = """
import importlib, pkgutil, {package}
for module in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(module.name)
"""


def imported_by(code: str) -> set[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter at the
    repository root."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=IMPORT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def under(modules: set[str], *packages: str) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in packages)


def test_importing_every_module_of_pipelines_imports_no_serving() -> None:
    modules = imported_by(WALK.format(package="pipelines"))
    assert {"pipelines.race", "pipelines.schedule"} <= modules  # the walk did import them
    assert not under(modules, "serving", "cli")


def test_importing_serving_config_imports_no_torch() -> None:
    modules = imported_by("import serving.config")
    assert "serving.config" in modules
    assert not under(modules, "torch")
