"""The benchmarks' seeds: each network is fitted once per seed and scored by the median, a
deterministic baseline once."""

from __future__ import annotations

from sktime.forecasting.base import BaseForecaster

from forecaster.benchmark import M4_MODELS, NETWORKS, median_over_seeds, network, seeded


def test_a_network_takes_each_seed_and_a_baseline_runs_once() -> None:
    for name in NETWORKS:
        model = seeded(network(name), 2)
        assert model is not None and model.get_params()["model__random_state"] == 2, name
    baseline = M4_MODELS["sNaive"]()
    assert seeded(baseline, 0) is baseline
    assert seeded(M4_MODELS["sNaive"](), 1) is None


def test_scores_are_the_median_over_the_seeds() -> None:
    def fit_and_score(model: BaseForecaster) -> dict[str, float]:
        seed = model.get_params().get("model__random_state", 0)
        return {"owa": [0.5, 0.2, 0.9][seed], "seconds": 10.0 * (seed + 1)}

    assert median_over_seeds(fit_and_score, M4_MODELS["GRU"], 3) == {
        "owa": 0.5, "seconds": 20.0, "runs": 3}
    assert median_over_seeds(fit_and_score, M4_MODELS["Theta"], 3) == {
        "owa": 0.5, "seconds": 10.0, "runs": 1}
