"""sktime's own conformance suite on every estimator of the library (``ESTIMATORS``), with the
tiny settings of ``get_test_params``, and on the weighted ensemble the race builds of them.
Each class runs several hundred checks (a few minutes on a CPU), hence slow. No check is
excluded: every failure so far has been a defect of the estimator, not of sktime."""

from __future__ import annotations

import pytest
from sktime.utils.estimator_checks import check_estimator

from forecaster.ensemble import WeightedEnsembleForecaster
from tests.conftest import estimator_classes


@pytest.mark.slow
@pytest.mark.parametrize("cls", estimator_classes())
def test_check_estimator(cls) -> None:
    check_estimator(cls, raise_exceptions=True)


@pytest.mark.slow
def test_check_the_ensemble() -> None:
    check_estimator(WeightedEnsembleForecaster, raise_exceptions=True)
