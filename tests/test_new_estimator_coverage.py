"""A new estimator class added to ``forecaster.estimators.ESTIMATORS`` is covered by the
parametrised tests (sktime's conformance suite, the estimator tests, the network tests) with no
edit to them: a pytest plugin adds a trivial subclass of LSTMForecaster before collection, and the
collected test ids must then name it wherever they name LSTMForecaster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tests/test_sktime_conformance.py", "tests/test_estimators.py", "tests/test_models.py")
NEW = "ExtraForecaster"
PLUGIN = f'''
from forecaster import estimators


class {NEW}(estimators.LSTMForecaster):
    """A family the tests were never told about; its test settings are LSTMForecaster's."""


estimators.ESTIMATORS = (*estimators.ESTIMATORS, {NEW})
'''
COLLECT_TIMEOUT_S = 300


def test_a_new_estimator_is_collected_by_every_parametrised_test(tmp_path: Path) -> None:
    (tmp_path / "extra_estimator_plugin.py").write_text(PLUGIN)
    # the plugin is imported while pytest parses its options, before any test module; no
    # plugins of other packages: collecting needs none, and loading them costs seconds
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "extra_estimator_plugin", *FILES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=COLLECT_TIMEOUT_S)
    assert result.returncode == 0, f"collection failed:\n{result.stdout}\n{result.stderr}"
    ids = {line for line in result.stdout.splitlines() if "::" in line}
    for file in FILES:
        assert any(i.startswith(f"{file}::") and NEW in i for i in ids), (
            f"{file} collects no test of {NEW}")
    # wherever a test runs for LSTMForecaster, it runs for the new class, with the same settings
    expected = {i.replace("LSTMForecaster", NEW) for i in ids if "LSTMForecaster" in i}
    assert expected, "no test is parametrised with LSTMForecaster"
    missing = sorted(expected - ids)
    assert not missing, f"not collected for {NEW}: {missing}"
