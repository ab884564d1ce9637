"""``make gpu-check`` (benchmarks/gpu_check.py) in CI, which has no GPU: its ``--help``, and its
CPU half on tiny settings, whose table names every network family of the library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_check import main
from forecaster.estimators import ESTIMATORS

REPO = Path(__file__).resolve().parents[1]


def test_help_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--cpu-only" in done.stdout and "--steps" in done.stdout


def test_the_cpu_half_trains_every_family_and_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    assert main(["--cpu-only", "--size", "tiny", "--steps", "40", "--out", str(out)]) == 0
    text = out.read_text()
    assert "all checks pass" in text and "FAILED" not in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "Forecaster" in line}
    assert set(rows) == {cls.__name__ for cls in ESTIMATORS}
    for family, line in rows.items():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert float(cells[1]) > 0, family  # steps per second on the CPU
        first, last = (float(v) for v in cells[2].split(" → "))
        assert last < first, family  # the loss fell
        assert cells[3] == "ok", family  # saved, loaded back and forecast
