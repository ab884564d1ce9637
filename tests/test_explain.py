"""Explanations without a server: the networks' attention over the input time steps (shapes,
rows summing to 1), each estimator's batched ``explain_histories`` against ``attention_maps``
spread over the time steps by hand, and POST /explain's request path as plain functions
(checked as /forecast checks a request, refused for a model without attention, one forward
pass per model, rendered with timestamps, the most-attended steps and the covariates'
importance, summed up in a line per series for the demo); the ``forecaster explain``
command's figure."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib import image

from cli.main import main
from forecaster import HybridForecaster, LSTMForecaster, NeuralForecaster, TransformerForecaster
from forecaster.data import TARGET, TIME, panel_to_long
from forecaster.estimators import explaining_families, explains
from forecaster.models import build_model
from forecaster.models.layers import Segments, spread_over_steps
from pipelines import registry
from pipelines.pyfunc_model import future_layout, log_forecaster
from serving.explain import explain_forward, prepare_explanation, render_explanations
from serving.first_forecast import top_inputs_summary
from serving.inference import RequestError
from serving.model import ServedModel, _neural_explain, load_version
from serving.schemas import ForecastRequest
from tests.conftest import estimator_variants, tiny
from tests.explain_support import reference_attention
from tests.pipeline_support import clean_mlflow_environment
from tests.serving_support import (
    HORIZON,
    MODEL_NAME,
    Registry,
    make_registry,
    register,
    vouch_like_a_race,
)

B, L, H = 3, 24, 5


# ---------------------------------------------------------------- the networks
def test_a_tokens_weight_is_shared_among_the_steps_it_reads() -> None:
    # tokens reading steps 0-3 and 2-5: the shared steps 2 and 3 get a share of each
    steps = spread_over_steps(torch.tensor([[0.5, 0.5]]), torch.tensor([0, 2]), 4, 6)
    torch.testing.assert_close(steps, torch.tensor([[0.125, 0.125, 0.25, 0.25, 0.125, 0.125]]))
    # segments of 4 over 10 steps read steps 2-5 and 6-9: the oldest 2 are read by none
    segments = Segments(4, 10).spread(torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(segments, torch.tensor(
        [[0.0, 0.0, 0.0625, 0.0625, 0.0625, 0.0625, 0.1875, 0.1875, 0.1875, 0.1875]]))


@pytest.mark.parametrize("family, params", [
    ("transformer", {"encoder": "patch", "patch_len": 6, "patch_stride": 3}),
    ("transformer", {"encoder": "timestep", "decoder_layers": 2}),
    ("hybrid", {"segment_len": 1}),
    ("hybrid", {"segment_len": 5}),
], ids=["transformer-patch", "transformer-timestep", "hybrid-steps", "hybrid-segments"])
def test_the_networks_attention_over_input_steps(family: str, params: dict) -> None:
    torch.manual_seed(0)
    model = build_model(family, input_len=L, horizon=H, n_quantiles=3, past_features=3,
                        future_features=1, d_model=8, n_heads=2, **params).eval()
    past, future = torch.randn(B, L, 3), torch.randn(B, H, 1)
    past[..., 1] = 1.0
    attention = model.explain(past, future)["attention"]
    assert attention.shape == (B, H, L) and (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(B, H))
    # the map belongs to these inputs: another history moves it
    assert not torch.allclose(attention, model.explain(past.flip(1), future)["attention"])


def test_the_hybrid_leaves_its_decoder_keys_out() -> None:
    torch.manual_seed(0)
    model = build_model("hybrid", input_len=L, horizon=H, n_quantiles=3, past_features=2,
                        future_features=0, d_model=8, n_heads=2, segment_len=4).eval()
    past, future = torch.randn(B, L, 2), torch.zeros(B, H, 0)
    raw = model.attention_maps(past, future)["attention"].mean(dim=1)  # (B, H, L/4 + H)
    encoder = raw[..., : L // 4]
    assert (raw[..., L // 4:].sum(-1) > 0).all()  # the decoder steps did take some weight
    expected = (encoder / encoder.sum(-1, keepdim=True)).repeat_interleave(4, dim=-1) / 4
    torch.testing.assert_close(model.explain(past, future)["attention"], expected)


# ---------------------------------------------------------------- the estimators
def _explaining_variants() -> list:
    return [p for p in estimator_variants() if explains(p.values[0])]


def test_the_families_with_attention_explain() -> None:
    assert explaining_families() == ["TransformerForecaster", "HybridForecaster"]
    assert not explains(LSTMForecaster()) and explains(HybridForecaster())


@pytest.mark.parametrize("cls, settings", _explaining_variants())
def test_explanations_equal_attention_maps_spread_over_steps(
        cls: type[NeuralForecaster], settings: dict, sine_panel: pd.DataFrame) -> None:
    model = tiny(cls, settings).fit(sine_panel, fh=[1, 2, 3])
    histories = [sine_panel.loc["a", TARGET].to_numpy(), np.linspace(0, 1, 5),
                 sine_panel.loc["c", TARGET].to_numpy()[-11:]]
    explanations = model.explain_histories(histories)  # one forward pass
    for history, explanation in zip(histories, explanations, strict=True):
        # a short history: its observed steps
        steps = min(len(history), model.resolved_params_["input_len"])
        assert explanation.attention.shape == (3, steps)
        np.testing.assert_allclose(explanation.attention.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(explanation.attention, reference_attention(model, history),
                                   rtol=1e-5, atol=1e-7)
        assert explanation.covariate_importance is None
        alone, = model.explain_histories([history])
        np.testing.assert_allclose(alone.attention, explanation.attention, rtol=1e-5,
                                   atol=1e-7)


def test_a_series_whose_observed_steps_no_token_reads_is_named(
        sine_panel: pd.DataFrame) -> None:
    # patches of 4 every 4 steps over 10 read steps 0-7: the last two, never
    model = tiny(TransformerForecaster, input_len=10, patch_len=4, patch_stride=4)
    model.fit(sine_panel, fh=[1, 2])
    assert model.min_history_ == 2
    with pytest.raises(ValueError, match="series 'b': the model's attention reads none of its "
                                         "2 observed values"):
        model.explain_histories([np.ones(10), np.ones(2)], ["a", "b"])


@pytest.mark.parametrize("cls", [TransformerForecaster, HybridForecaster])
def test_forecasts_in_another_thread_leave_explanations_alone(
        cls: type[NeuralForecaster], sine_panel: pd.DataFrame) -> None:
    """The service forecasts and explains in two threads, on one network that keeps its
    attention while explaining: a forecast pass meanwhile must not replace it."""
    model = tiny(cls, input_len=24).fit(sine_panel, fh=[1, 2, 3])
    histories = [np.sin(np.arange(40) / 3 + i) for i in range(8)]
    expected = [e.attention for e in model.explain_histories(histories)]
    others = [np.random.default_rng(i).normal(size=60) for i in range(64)]
    stop = threading.Event()

    def forecast() -> None:
        while not stop.is_set():
            model.forecast_histories(others)

    thread = threading.Thread(target=forecast)
    thread.start()
    try:
        for _ in range(200):
            got = model.explain_histories(histories)
            for explanation, attention in zip(got, expected, strict=True):
                np.testing.assert_allclose(explanation.attention, attention, atol=1e-6)
    finally:
        stop.set()
        thread.join()


def _with_covariates(panel: pd.DataFrame) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    sizes = {key: 1.0 + i for i, key in enumerate(panel.index.get_level_values(0).unique())}
    return pd.DataFrame({"promo": (rng.random(len(panel)) < 0.3).astype(float),
                         "size": [sizes[key] for key in panel.index.get_level_values(0)]},
                        index=panel.index)


@pytest.mark.parametrize("cls, weighs", [(HybridForecaster, True),
                                         (TransformerForecaster, False)])
def test_covariate_importance_comes_with_the_explanation(
        cls: type[NeuralForecaster], weighs: bool, sine_panel: pd.DataFrame) -> None:
    X = _with_covariates(sine_panel)
    model = tiny(cls, static_covariates=("size",)).fit(sine_panel, X=X, fh=[1, 2, 3])
    history = sine_panel.loc["b", TARGET].to_numpy()
    known = np.concatenate([X.loc["b", ["promo"]].to_numpy(), [[1.0], [0.0], [0.0]]])
    explanation, = model.explain_histories([history], covariates=[known], static=[[2.0]])
    np.testing.assert_allclose(explanation.attention,
                               reference_attention(model, history, known, np.array([2.0])),
                               rtol=1e-5, atol=1e-7)
    if weighs:  # the hybrid's variable selection weighs each covariate
        assert explanation.covariate_importance == model.covariate_importance(
            history, known, [2.0])
        assert set(explanation.covariate_importance) == {"promo", "size"}
        assert 0 < sum(explanation.covariate_importance.values()) < 1
    else:
        assert explanation.covariate_importance is None


# ---------------------------------------------------------------- the request path
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, sine_panel: pd.DataFrame) -> Registry:
    """An LSTM @champion (no attention), then a Transformer (v2) and a hybrid (v3)."""
    with clean_mlflow_environment():
        store = make_registry(tmp_path_factory.mktemp("explain"), sine_panel, seeds=(0,))
        for cls in (TransformerForecaster, HybridForecaster):
            estimator = tiny(cls, input_len=24).fit(sine_panel, fh=list(range(1, HORIZON + 1)))
            store.estimators[register(estimator, sine_panel)] = estimator
        yield store


@pytest.fixture(scope="module")
def served(store: Registry) -> dict[int, ServedModel]:
    return {number: load_version(store.client, store.client.get_model_version(
        MODEL_NAME, str(number)), "champion", warmup_batch=4) for number in store.estimators}


def _request(series: list[dict], horizon: int = HORIZON, **fields: object) -> ForecastRequest:
    # as JSON, as over HTTP: the schema is strict, and only JSON spells a time as a string
    return ForecastRequest.model_validate_json(json.dumps(
        {"series": series, "horizon": horizon, **fields}))


def _answer(request: ForecastRequest, model: ServedModel) -> dict:
    prepared = prepare_explanation(request, model, max_series=100)
    return json.loads(render_explanations(request, prepared,
                                          explain_forward([prepared.items()])[0]))


@pytest.mark.parametrize("version", [2, 3], ids=["transformer", "hybrid"])
def test_the_answer_is_the_models_attention_over_the_input_steps(
        store: Registry, served: dict[int, ServedModel], version: int,
        sine_panel: pd.DataFrame) -> None:
    model, estimator = served[version], store.estimators[version]
    assert model.info.explains
    histories = {"a": sine_panel.loc["a", TARGET].to_numpy(), "short": np.linspace(1, 2, 9)}
    body = _answer(_request([
        {"id": "a", "values": histories["a"].tolist(), "start": "2024-03-01T00:00:00",
         "freq": "h"},
        {"id": "short", "values": histories["short"].tolist()}], horizon=4), model)
    assert body["model"] == {"name": MODEL_NAME, "version": version, "alias": "champion"}
    first, short = body["explanations"]
    for entry in (first, short):
        expected = reference_attention(estimator, histories[entry["id"]])[:4]
        attention = np.asarray(entry["attention"])
        np.testing.assert_allclose(attention, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-6)
        mean = attention.mean(axis=0)
        assert [t["position"] for t in entry["top_inputs"]] == \
            list(np.argsort(-mean, kind="stable")[:5])
        for top in entry["top_inputs"]:
            assert top["weight"] == pytest.approx(mean[top["position"]])
            assert top["lag"] == attention.shape[1] - top["position"]
        assert "covariate_importance" not in entry
    assert np.asarray(first["attention"]).shape == (4, 24)  # the input window's 24 steps
    assert first["input_timestamps"][0] == "2024-03-03T08:00:00"  # value 56 of 80
    assert first["input_timestamps"][-1] == "2024-03-04T07:00:00"  # the last value
    assert first["top_inputs"][0]["timestamp"] == \
        first["input_timestamps"][first["top_inputs"][0]["position"]]
    assert np.asarray(short["attention"]).shape == (4, 9)  # only the observed steps
    assert "input_timestamps" not in short and "timestamp" not in short["top_inputs"][0]


def test_the_demo_sums_up_an_answer_by_its_most_attended_inputs(
        served: dict[int, ServedModel], sine_panel: pd.DataFrame) -> None:
    # neighbouring steps of equal weight (one patch's) read as one range
    answer = {"explanations": [{"id": "a", "attention": [[0.0] * 48], "top_inputs": [
        {"position": 24, "lag": 24, "timestamp": "t24", "weight": 0.1},
        {"position": 25, "lag": 23, "timestamp": "t25", "weight": 0.1},
        {"position": 47, "lag": 1, "timestamp": "t47", "weight": 0.05}]}]}
    assert top_inputs_summary(answer) == ("a: 24-23 back (t24 to t25) 0.100 each, "
                                          "1 back (t47) 0.050 (an even spread: 0.021 each)")
    # a served model's answer: a line per series
    body = _answer(_request([
        {"id": "a", "values": sine_panel.loc["a", TARGET].tolist(),
         "start": "2024-03-01T00:00:00", "freq": "h"},
        {"id": "short", "values": np.linspace(1, 2, 9).tolist()}], horizon=4), served[2])
    first, short = top_inputs_summary(body).splitlines()
    top = body["explanations"][0]["top_inputs"][0]
    assert first.startswith(f"a: {top['lag']}")
    assert top["timestamp"] in first and first.endswith(f"(an even spread: {1 / 24:.3f} each)")
    assert short.startswith("short: ") and short.endswith(f"(an even spread: {1 / 9:.3f} each)")

def test_a_model_without_attention_is_refused_naming_the_families(
        served: dict[int, ServedModel]) -> None:
    lstm = served[1]
    assert not lstm.info.explains and lstm.explain is None
    with pytest.raises(RequestError) as caught:
        prepare_explanation(_request([{"id": "a", "values": [1.0] * 30}]), lstm, 100)
    assert (caught.value.loc, caught.value.reason) == ((), "model_cannot_explain")
    assert caught.value.body()["error"] == (
        f"model {MODEL_NAME} v1 (LSTMForecaster) has no attention to explain its forecasts "
        "with; the families that explain are TransformerForecaster, HybridForecaster")


@pytest.mark.parametrize("fields, loc, reason", [
    ({"horizon": HORIZON + 1}, ("horizon",), "horizon_too_large"),
    ({"quantiles": [0.5, 0.33]}, ("quantiles", 1), "unknown_quantile"),
    ({"series": [{"id": "a", "values": [1.0, 2.0]}]}, ("series", 0, "values"),
     "history_too_short"),
    ({"series": [{"id": "a", "values": [1e19, 0.0] * 20}]}, ("series", 0, "values"),
     "value_too_large"),
    ({"series": [{"id": "a", "values": [1.0] * 30, "covariates": {"promo": [0.0] * 36}}]},
     ("series", 0, "covariates", "promo"), "unknown_covariate"),
    ({"series": [{"id": str(i), "values": [1.0] * 30} for i in range(3)]}, ("series",),
     "too_many_series"),
])
def test_explanations_are_checked_as_forecasts_are(served: dict[int, ServedModel],
                                                   fields: dict, loc: tuple,
                                                   reason: str) -> None:
    body = {"series": [{"id": "a", "values": [1.0] * 30}], "horizon": HORIZON, **fields}
    with pytest.raises(RequestError) as caught:
        prepare_explanation(ForecastRequest.model_validate(body), served[3], max_series=2)
    assert (caught.value.loc, caught.value.reason) == (loc, reason)
    assert ".".join(map(str, loc)) in caught.value.body()["error"]


def test_one_forward_pass_per_model_in_a_batch(served: dict[int, ServedModel]) -> None:
    calls = []

    def counted(model: ServedModel) -> ServedModel:
        def explain(inputs: list[np.ndarray]) -> list:
            calls.append((model.version, len(inputs)))
            return model.explain(inputs)
        return dataclasses.replace(model, explain=explain)

    transformer, hybrid = counted(served[2]), counted(served[3])
    request = _request([{"id": str(i), "values": np.sin(np.arange(20 + i)).tolist()}
                        for i in range(3)])
    jobs = [prepare_explanation(request, model, 100).items()
            for model in (transformer, hybrid, transformer)]
    results = explain_forward(jobs)
    assert sorted(calls) == [(2, 6), (3, 3)]
    # the same series in two places of one batch: a matrix product may round a row by its
    # place in the batch (BLAS kernels block the rows), so equal to float32 rounding
    np.testing.assert_allclose(results[0][1].attention, results[2][1].attention,
                               rtol=1e-6, atol=1e-9)
    assert results[0][1].attention.shape == results[1][1].attention.shape == (HORIZON, 21)


def test_a_series_that_cannot_be_explained_fails_alone(
        served: dict[int, ServedModel], sine_panel: pd.DataFrame) -> None:
    estimator = tiny(TransformerForecaster, input_len=10, patch_len=4, patch_stride=4)
    estimator.fit(sine_panel, fh=list(range(1, HORIZON + 1)))
    model = dataclasses.replace(served[2], explain=_neural_explain(estimator),
                                info=served[2].info.model_copy(update={"min_history": 2}))
    explanations = model.explain([np.ones(12, np.float32), np.ones(2, np.float32)])
    assert explanations[0].attention.shape == (HORIZON, 10)
    assert "reads none of its 2 observed values" in str(explanations[1])
    request = _request([{"id": "fine", "values": [1.0] * 12}, {"id": "few", "values": [1, 2]}])
    prepared = prepare_explanation(request, model, 100)
    with pytest.raises(RequestError) as caught:
        render_explanations(request, prepared, explanations)
    assert (caught.value.loc, caught.value.reason) == (("series", 1, "values"), "model_failed")
    assert "series 'few' could not be explained" in caught.value.message


def test_a_covariate_hybrid_answers_its_covariates_importance(
        tmp_path: Path, sine_panel: pd.DataFrame) -> None:
    X = _with_covariates(sine_panel)
    estimator = tiny(HybridForecaster, input_len=24, static_covariates=("size",))
    estimator.fit(sine_panel, X=X, fh=list(range(1, HORIZON + 1)))
    long = panel_to_long(sine_panel).join(X.reset_index(drop=True))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(
            "explain-covariates", artifact_location=str(tmp_path / "artifacts")))
        with mlflow.start_run():
            info = log_forecaster(estimator, horizon=HORIZON, levels=list(estimator.levels_),
                                  frequency="h", input_example=future_layout(long, HORIZON),
                                  known_future=["promo"], static=["size"])
        version = registry.register_version(info, "explain-covariates", {})
        vouch_like_a_race("explain-covariates", int(version.version))  # as a race would
        client = mlflow.MlflowClient(uri, uri)
        model = load_version(client, client.get_model_version("explain-covariates",
                                                              version.version),
                             "champion", warmup_batch=2)
    history = sine_panel.loc["a", TARGET].to_numpy()[:-HORIZON]
    promo = X.loc["a", "promo"].to_numpy()
    body = _answer(_request([{"id": "a", "values": history.tolist(),
                              "covariates": {"promo": promo.tolist()},
                              "static": {"size": 1.0}}]), model)
    entry, = body["explanations"]
    known, static = promo[:, None], np.array([1.0])
    np.testing.assert_allclose(entry["attention"],
                               reference_attention(estimator, history, known, static),
                               rtol=1e-5, atol=1e-7)
    expected = estimator.covariate_importance(history, known, static)
    assert set(entry["covariate_importance"]) == {"promo", "size"}
    for name, weight in expected.items():
        assert entry["covariate_importance"][name] == pytest.approx(weight, rel=1e-5)


# ---------------------------------------------------------------- forecaster explain
def test_the_explain_command_draws_the_forecast_above_the_heat_map(
        store: Registry, sine_panel: pd.DataFrame, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    long = panel_to_long(sine_panel)
    long[TIME] = pd.Timestamp("2024-01-01") + pd.to_timedelta(long[TIME], unit="h")
    series = tmp_path / "history.csv"
    long.to_csv(series, index=False)
    out = tmp_path / "figures" / "heatmap.png"
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(store.uri)
        main(["explain", f"models:/{MODEL_NAME}/3", "--series", str(series), "--out", str(out),
              "--id", "b", "--horizon", "4"])
        printed = capsys.readouterr().out
        assert f"{out}: series b, 4 forecast steps x 24 input steps; most attended: " in printed
        height, width, _ = image.imread(out).shape
        assert (width, height) == (1320, 840)  # 11 x 7 inches at 120 dpi
        with pytest.raises(SystemExit, match="LSTMForecaster has no attention to explain its "
                                             "forecasts with; the families that explain are "
                                             "TransformerForecaster, HybridForecaster"):
            main(["explain", f"models:/{MODEL_NAME}/1", "--series", str(series), "--out",
                  str(tmp_path / "lstm.png")])
        with pytest.raises(SystemExit, match=r"no series 'z' in the input \(its first ids: "
                                             r"\['a', 'b', 'c'\]\)"):
            main(["explain", f"models:/{MODEL_NAME}/3", "--series", str(series), "--out",
                  str(out), "--id", "z"])
    assert not (tmp_path / "lstm.png").exists()
