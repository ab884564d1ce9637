"""sktime estimators over the neural models: RNN, LSTM, GRU, TCN and Transformer forecasters.

Each is a global model: ``fit`` on a ``pd-multiindex`` panel trains one network on every series
(a single series works too). Series not seen in training are forecast from their history with
sktime's pretrain workflow::

    model = LSTMForecaster().pretrain(panel, fh=range(1, 49))  # train the network
    model.fit(new_history, fh=range(1, 49))                    # only sets the context
    model.predict()

The same holds for a model read back with ``NeuralForecaster.load_model``. Forecasts come from
one forward pass over all series at once: ``forecast_histories`` is that numeric path. The
families with attention (``explains``) also explain forecasts: ``explain_histories`` gives the
attention of each forecast step over the input time steps, in one forward pass as well.
"""

from __future__ import annotations

import copy
import inspect
import json
import tempfile
import textwrap
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from sktime.forecasting.base import BaseForecaster, ForecastingHorizon

from forecaster.data import (
    panel_arrays,
    series_groups,
    series_id,
    series_label,
    validate_panel,
)
from forecaster.models import build_model
from forecaster.models.losses import make_loss
from forecaster.seasonality import index_frequency, panel_season_length
from forecaster.trainer import (
    EpochRecord,
    TrainingSettings,
    autocast,
    best_epoch,
    choose_device,
    model_inputs,
    predict_scaled,
    train,
)
from forecaster.windows import Panel, Windows, WindowSampler

DEFAULT_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
WEIGHTS_FILE, CONFIG_FILE = "weights.pt", "config.json"
AUTO = "auto"  # a size that fit derives from the data (resolved_params_)
TRAINING = TrainingSettings()  # the training defaults every family shares

# the fitted attributes that make up a trained network; pretrain keeps them across fit calls
TRAINED_ATTRIBUTES = [
    "network_", "horizon_", "levels_", "model_kwargs_", "covariates_", "static_covariates_",
    "covariate_loc_", "covariate_scale_", "residual_quantiles_", "history_", "min_history_",
    "resolved_params_",
]


# While a network explains a forecast its attention modules keep their weights on themselves,
# where a forward pass in another thread (the service forecasts and explains in two) would
# overwrite them: every inference pass on a network holds its lock. Kept beside the network
# rather than on it, as a lock cannot be pickled or deep-copied with the estimator.
_INFERENCE_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = \
    weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _inference_lock(network: torch.nn.Module) -> threading.Lock:
    with _LOCKS_GUARD:
        return _INFERENCE_LOCKS.setdefault(network, threading.Lock())


class NeuralForecaster(BaseForecaster):
    """Base of the neural forecasters; subclasses name the model family and its parameters."""

    _tags = {
        "authors": ["forecaster team"],
        "python_dependencies": "torch",
        "y_inner_mtype": ["pd.DataFrame", "pd-multiindex", "pd_multiindex_hier"],
        "X_inner_mtype": ["pd.DataFrame", "pd-multiindex", "pd_multiindex_hier"],
        "capability:exogenous": True,
        "capability:multivariate": False,
        "capability:insample": False,
        "capability:pred_int": True,
        "capability:pred_int:insample": False,
        "capability:missing_values": False,
        "capability:pretrain": True,
        "pretrain:fitted_params": TRAINED_ATTRIBUTES,
        "capability:random_state": True,
        "property:randomness": "derandomized",
        "requires-fh-in-fit": True,
        # covariates are needed for every step up to the horizon, not only the requested ones
        "capability:non_contiguous_X": False,
    }

    # we keep the context ourselves (see _fit and _update) instead of sktime's _y and _X
    _config: ClassVar[dict[str, Any]] = {"remember_data": False}

    _family: ClassVar[str] = ""
    _model_params: ClassVar[tuple[str, ...]] = ()  # constructor args passed on to the network
    _fixed_model_kwargs: ClassVar[dict[str, Any]] = {}
    # input_len="auto": this many seasons or, if more, the whole seasons that cover this many
    # horizons, before the series lengths cap it (resolved_params)
    _input_seasons: ClassVar[int] = 7
    _input_horizons: ClassVar[int] = 2
    # refit_full="auto" refits when the validation rows are at least this share of the median
    # series: short series hold out 20 % and more, and gained; M4 Hourly holds out 5 %, where
    # refitting was mixed (the recurrent families worse, TCN and the Transformer better)
    _refit_share: ClassVar[float] = 0.1
    # the family's own "auto" sizes: name -> its value from those resolved before it
    _auto_rules: ClassVar[dict[str, Callable[[dict[str, int]], int]]] = {}
    # sizes that count steps of the input: an "auto" input holds at least one of each
    _input_units: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ sktime interface
    def _pretrain(self, y: pd.DataFrame, X: pd.DataFrame | None = None,
                  fh: ForecastingHorizon | None = None) -> NeuralForecaster:
        if fh is None and not hasattr(self, "horizon_"):
            raise ValueError("fh is required to pretrain: the network forecasts a fixed horizon")
        horizon = self.horizon_ if fh is None else self._horizon_of(fh, y)
        if y.shape[1] > 1:  # sktime hands pretrain multivariate panels: each column is a series
            if X is not None:
                raise ValueError("pretrain on several target columns takes no X")
            levels = y.index.nlevels
            stacked = y.stack(future_stack=True)  # index (*instance, time, column)
            order = [*range(levels - 1), levels, levels - 1]  # -> (*instance, column, time)
            y = stacked.reorder_levels(order).sort_index().to_frame(y.columns[0])
        self._train_network(y, X, horizon)
        return self

    def _fit(self, y: pd.DataFrame, X: pd.DataFrame | None, fh: ForecastingHorizon
             ) -> NeuralForecaster:
        horizon = self._horizon_of(fh, y)
        if hasattr(self, "network_"):  # pretrained: y is only the context to forecast from
            self._check_horizon(horizon)
            validate_panel(y, self.min_history_, name="y")
        else:
            self._train_network(y, X, horizon)
        self._context_y, self._context_X = y, X
        return self

    def _update(self, y: pd.DataFrame, X: pd.DataFrame | None = None,
                update_params: bool = True) -> NeuralForecaster:
        """New observations extend the context forecasts start from; the network is kept."""
        self._context_y = _append(self._context_y, y)
        self._context_X = X if self._context_X is None else _append(self._context_X, X)
        return self

    def _predict(self, fh: ForecastingHorizon, X: pd.DataFrame | None = None) -> pd.DataFrame:
        index, quantiles = self._forecast(fh, X)
        column = self._quantile_position(0.5)
        return pd.DataFrame({self._context_y.columns[0]: quantiles[:, column]}, index=index)

    def _predict_quantiles(self, fh: ForecastingHorizon, X: pd.DataFrame | None,
                           alpha: list[float]) -> pd.DataFrame:
        index, quantiles = self._forecast(fh, X)
        levels = np.asarray(self.levels_)
        for a in alpha:
            if not levels[0] - 1e-9 <= a <= levels[-1] + 1e-9:  # 1 - 0.95 is 0.0499...
                raise ValueError(
                    f"alpha {a} is outside the quantiles the model was trained for "
                    f"({levels[0]} to {levels[-1]}); set `quantiles` to include it"
                )
        # linear interpolation between the trained levels; exact where alpha is one of them
        values = np.stack([
            np.array([np.interp(a, levels, row) for row in quantiles]) for a in alpha
        ], axis=1)
        columns = pd.MultiIndex.from_product([[self._context_y.columns[0]], alpha])
        return pd.DataFrame(values, index=index, columns=columns)

    # ------------------------------------------------------------------ training
    def min_train_length(self, horizon: int) -> int:
        """The fewest observations per series that ``fit`` can train on for ``horizon`` when
        every series is that short: the shortest usable history, one horizon to learn from,
        and the validation rows. Shorter series may join a panel with longer ones: they give
        no training windows of their own, and are forecast with left padding.

        With ``input_len="auto"`` the input shrinks with the series, on series this short to
        a single step (or one explicit segment or patch; see ``resolved_params``): the
        shortest usable history counted here is the one of that least input."""
        given = self._given_sizes()
        input_len = given["input_len"] or self._least_input(given)
        return self._min_history(input_len) + horizon + (given["validation_rows"] or horizon)

    def resolved_params(self, y: pd.DataFrame, horizon: int) -> dict[str, int]:
        """The sizes ``fit`` and ``pretrain`` train with on the panel ``y`` for ``horizon``
        steps ahead: each "auto" parameter resolved, explicit ones as given (kept after
        training as ``resolved_params_``).

        * ``season_length``: the one the frequency of ``y``'s time index implies (1 for
          integer timestamps or dates without a regular frequency);
        * ``validation_rows``: the horizon;
        * ``refit_full``: whether to train again on every row after early stopping: when the
          validation rows are a tenth or more of the median series length (``_refit_share``);
        * ``input_len``: ``_input_seasons`` seasons (7; the Transformer 14) or, if more, the
          whole seasons that cover ``_input_horizons`` horizons (2; the Transformer 4); at
          most half the median series length, and at most what the median series holds
          besides the horizon and the validation rows, so that training windows are mostly
          observed values rather than padding; whole seasons when that cap is one season or
          more; at least one step, and one whole segment (patch) of an explicit
          ``segment_len`` (``patch_len``). M4 Hourly (season 24, horizon 48, median length
          960): 168, the Transformer 336; monthly series of 48 to 126 values, horizon 18: 36;
        * the family's own sizes, from the season and the input length (``segment_len``,
          ``patch_len``, ``patch_stride``: see their parameter docs).
        """
        given = self._given_sizes()
        season = given["season_length"] or panel_season_length(y)
        validation = given["validation_rows"] or horizon
        lengths = [len(series) for _, series in series_groups(y)]
        refit = bool(self._refit_share * np.median(lengths) <= validation) \
            if self.refit_full == AUTO else self.refit_full
        resolved = {"season_length": season, "validation_rows": validation,
                    "refit_full": refit,
                    "input_len": given["input_len"] or self._auto_input_len(
                        season, horizon, validation, lengths, self._least_input(given))}
        for name, rule in self._auto_rules.items():
            resolved[name] = given[name] or rule(resolved)
        return resolved

    def _auto_input_len(self, season: int, horizon: int, validation_rows: int,
                        lengths: list[int], least: int) -> int:
        seasons = max(self._input_seasons, -(-self._input_horizons * horizon // season))
        median = int(np.median(lengths))
        cap = min(median // 2, median - horizon - validation_rows)
        if cap >= season:
            cap -= cap % season  # whole seasons: segments and patches end at the origin
        return max(least, min(seasons * season, cap))

    def _least_input(self, given: dict[str, int | None]) -> int:
        return max([1, *(given[name] or 1 for name in self._input_units)])

    def _given_sizes(self) -> dict[str, int | None]:
        """Each size parameter as given: its value, or None for "auto" (and for
        validation_rows=None, its default before "auto"). Any other value is a ValueError
        naming the parameter."""
        given = {}
        for name in ("season_length", "input_len", "validation_rows", *self._auto_rules):
            value = getattr(self, name)
            if (isinstance(value, str) and value == AUTO) or \
                    (value is None and name == "validation_rows"):
                given[name] = None
            elif isinstance(value, bool) or not isinstance(value, int | np.integer) \
                    or value < 1:
                raise ValueError(f"{name} must be a positive integer or {AUTO!r}, got "
                                 f"{value!r}")
            else:
                given[name] = int(value)
        if not (isinstance(self.refit_full, bool) or self.refit_full == AUTO):
            raise ValueError(f"refit_full must be True, False or {AUTO!r}, got "
                             f"{self.refit_full!r}")
        return given

    def _min_history(self, input_len: int) -> int:
        return self.min_history or max(1, input_len // 4)

    def _fitted_min_history(self, y: pd.DataFrame, input_len: int) -> int:
        """The shortest history forecasts take, at most the shortest series of ``y``: a global
        model forecasts every series it was fitted on (left padding and the observed mask
        cover what a short one lacks). An explicit ``min_history`` that a series of ``y``
        falls short of is refused here rather than at predict."""
        key, shortest = min(((key, len(series)) for key, series in series_groups(y)),
                            key=lambda pair: pair[1])
        if self.min_history is not None and self.min_history > shortest:
            raise ValueError(f"{series_label('y', key)} has {shortest} observations, fewer "
                             f"than min_history={self.min_history}: it could not be forecast; "
                             "lower min_history or leave the series out")
        return min(self._min_history(input_len), shortest)

    def _train_network(self, y: pd.DataFrame, X: pd.DataFrame | None, horizon: int) -> None:
        allowed = [y.columns[0]]
        validate_panel(y, 1, allowed, name="y")
        sizes = self.resolved_params_ = self.resolved_params(y, horizon)
        self.min_history_ = self._fitted_min_history(y, sizes["input_len"])
        statics = list(self.static_covariates or ())
        if X is not None:
            validate_panel(X, 1, name="X")
        elif statics:
            raise ValueError(f"static_covariates {statics} are named but X is None")
        covariates = [] if X is None else [c for c in X.columns if c not in statics]
        missing = [c for c in statics if X is None or c not in X.columns]
        if missing:
            raise ValueError(f"static_covariates {missing} are not columns of X")

        self.horizon_, self.levels_ = horizon, sorted({*self.quantiles, 0.5})
        self.covariates_, self.static_covariates_ = covariates, statics
        if X is not None and covariates:
            self.covariate_loc_ = X[covariates].mean().to_numpy(np.float32)
            self.covariate_scale_ = X[covariates].std(ddof=0).replace(0, 1).to_numpy(np.float32)
        else:
            self.covariate_loc_ = self.covariate_scale_ = np.zeros(0, np.float32)

        panel = self._panel(y, X)
        sampler = WindowSampler(panel, sizes["input_len"], horizon, self.min_history_,
                                sizes["validation_rows"])
        n_outputs = 1 if self.loss in ("mae", "mse") else len(self.levels_)
        self.model_kwargs_ = {
            "input_len": sizes["input_len"],
            "horizon": horizon,
            "n_quantiles": n_outputs,
            "past_features": 2 + len(covariates) + len(statics),
            "future_features": len(covariates) + len(statics),
            **self._fixed_model_kwargs,
            **{name: sizes.get(name, getattr(self, name)) for name in self._model_params},
        }
        torch.manual_seed(self.random_state or 0)  # the initial weights are part of the seed
        self.network_ = build_model(self._family, **self.model_kwargs_)
        initial = copy.deepcopy(self.network_.state_dict())
        loss, settings = make_loss(self.loss, self.levels_), self._settings()
        self.history_: list[EpochRecord] = train(
            self.network_, sampler, loss, settings, on_epoch=self.on_epoch)
        self.network_.cpu()
        # from the early-stopped network: its validation errors are out of sample
        self.residual_quantiles_ = self._residual_quantiles(sampler) if n_outputs == 1 else None
        if sizes["refit_full"]:
            self.network_.load_state_dict(initial)
            train(self.network_, sampler.including_validation(), loss, settings,
                  epochs=best_epoch(self.history_) + 1)
            self.network_.cpu()

    def _settings(self) -> TrainingSettings:
        return TrainingSettings(
            max_epochs=self.max_epochs, steps_per_epoch=self.steps_per_epoch,
            batch_size=self.batch_size, learning_rate=self.learning_rate,
            weight_decay=self.weight_decay, patience=self.patience, device=self.device,
            seed=self.random_state or 0, progress=self.verbose,
        )

    def _residual_quantiles(self, sampler: WindowSampler) -> list[list[float]]:
        """Point losses give no quantiles: take them from the validation errors, per step."""
        validation = sampler.validation()
        point = predict_scaled(self.network_, validation, torch.device("cpu"))[..., 0]
        errors = validation.target - point  # (B, H), in the windows' scaled units
        spread = np.quantile(errors, self.levels_, axis=0).T  # (H, Q)
        # centred on the median error, so that the 0.5 level is the point forecast itself
        return (spread - spread[:, [self._quantile_position(0.5)]]).tolist()

    # ------------------------------------------------------------------ forecasting
    def forecast_histories(self, histories: Sequence[np.ndarray],
                           ids: Sequence[object] | None = None, *,
                           covariates: Sequence[np.ndarray] | None = None,
                           static: Sequence[Sequence[float]] | np.ndarray | None = None
                           ) -> np.ndarray:
        """Quantile forecasts (series, horizon_, levels_) for raw target histories.

        ``histories`` holds one array (time,) of target values per series. A model trained
        with covariates takes them raw, in their own units (they are scaled here, as in
        ``fit``):

        * ``covariates``: one array per series of shape (time + steps, len(covariates_)),
          columns in the order of ``covariates_``: the known-future covariates at each time of
          the history, then at the next ``steps`` (usually ``horizon_``, at least 1). With
          fewer than ``horizon_`` steps the last row is held for the later ones, whose
          forecasts then rest on that assumption;
        * ``static``: one row per series of the ``static_covariates_`` values, shape
          (series, len(static_covariates_)).

        This is the whole inference path: no pandas, one forward pass for all series. ``ids``
        name the series in error messages (default: their positions).
        """
        windows = self._forecast_windows(histories, ids, covariates, static)
        with _inference_lock(self.network_):
            device = self._network_device()
            scaled = predict_scaled(self.network_, windows, device)  # (N, H, outputs)
        if self.residual_quantiles_ is not None:
            scaled = scaled + np.asarray(self.residual_quantiles_, np.float32)[None]
        # sorting rearranges crossed quantiles into valid ones (Chernozhukov et al., 2010)
        return np.sort(windows.unscale(scaled), axis=-1)

    def _check_trained(self) -> None:
        """The numeric paths need a trained network only: fitted, pretrained or loaded."""
        if not hasattr(self, "network_"):
            self.check_is_fitted()  # sktime's NotFittedError

    def _network_device(self) -> torch.device:
        """The device forecasts run on; the network is moved there if it is elsewhere."""
        device = choose_device(self.device)
        if next(self.network_.parameters()).device != device:
            # moving only when needed: Module.to rebuilds an LSTM's flat weights, which a
            # forecast running concurrently in another thread may be reading
            self.network_.to(device)
        return device

    def _forecast_windows(self, histories: Sequence[np.ndarray],
                          ids: Sequence[object] | None = None,
                          covariates: Sequence[np.ndarray] | None = None,
                          static: Sequence[Sequence[float]] | np.ndarray | None = None
                          ) -> Windows:
        """One window per history at its forecast origin, as ``forecast_histories`` reads them."""
        # ids as the user wrote them: a one-level panel's group keys are 1-tuples
        names = list(range(len(histories))) if ids is None else [series_id(i) for i in ids]
        if len(names) != len(histories):
            raise ValueError(f"{len(names)} ids for {len(histories)} histories")
        targets = []
        for name, history in zip(names, histories, strict=True):
            history = np.asarray(history, dtype=np.float32)
            if history.ndim != 1:
                raise ValueError(f"series {name!r}: a history is one target value per time step, "
                                 f"shape (time,); got shape {history.shape} (covariates go in "
                                 "`covariates` and `static`)")
            if len(history) < self.min_history_:
                raise ValueError(f"series {name!r} has {len(history)} observations; the model "
                                 f"needs at least {self.min_history_}")
            # the horizon rows hold no target: they carry the known-future covariates
            targets.append(np.concatenate([history, np.zeros(self.horizon_, np.float32)]))
        known = self._known_future_rows(names, targets, covariates)
        arrays = [t[:, None] if k is None else np.concatenate([t[:, None], k], axis=1)
                  for t, k in zip(targets, known, strict=True)]
        panel = Panel(arrays, self._static_rows(names, static))
        origins = panel.lengths - self.horizon_
        # the network's own input length: resolved_params_ records it too, but models saved
        # before it was recorded have it only here
        return panel.windows(np.arange(len(panel)), origins, self.model_kwargs_["input_len"],
                             self.horizon_)

    def _known_future_rows(self, names: list[object], targets: list[np.ndarray],
                           covariates: Sequence[np.ndarray] | None) -> list[np.ndarray | None]:
        """Scaled known-future covariates per series, held up to the horizon, or Nones."""
        expected = len(self.covariates_)
        if not expected:
            if covariates is not None:
                raise ValueError("the model was trained without known-future covariates; "
                                 "pass covariates=None")
            return [None] * len(targets)
        if covariates is None:
            observed = len(targets[0]) - self.horizon_
            raise ValueError(
                f"the model was trained with the known-future covariates {self.covariates_}: "
                f"pass `covariates`, one array per series with a row per history value and "
                f"per step ahead (series {names[0]!r}: {observed} + {self.horizon_} = "
                f"{observed + self.horizon_} rows)")
        if len(covariates) != len(targets):
            raise ValueError(f"{len(covariates)} covariate arrays for {len(targets)} series")
        rows = []
        for name, target, values in zip(names, targets, covariates, strict=True):
            values = np.asarray(values, dtype=np.float32)
            values = values.reshape(len(values), -1) if values.ndim == 1 else values
            observed = len(target) - self.horizon_
            if values.ndim != 2 or values.shape[1] != expected:
                raise ValueError(f"series {name!r}: covariates of shape {values.shape}; expected "
                                 f"{expected} column(s), {self.covariates_}")
            steps = len(values) - observed
            if not 1 <= steps <= self.horizon_:
                raise ValueError(
                    f"series {name!r}: covariates have {len(values)} rows; expected "
                    f"{observed} + {self.horizon_} = {observed + self.horizon_} (one per "
                    f"history value, then one per step ahead)")
            bad = np.argwhere(~np.isfinite(values))
            if len(bad):
                row, column = bad[0]
                raise ValueError(f"series {name!r}: covariate {self.covariates_[column]!r} is "
                                 f"{values[row, column]} at row {row}; values must be finite")
            held = np.concatenate([values, np.repeat(values[-1:], self.horizon_ - steps, 0)])
            rows.append(self._scale_covariates(held))
        return rows

    def _static_rows(self, names: list[object],
                     static: Sequence[Sequence[float]] | np.ndarray | None) -> np.ndarray | None:
        """The static covariates (series, n_static), checked, or None for a model without."""
        expected = len(self.static_covariates_)
        if not expected:
            if static is not None:
                raise ValueError("the model was trained without static covariates; "
                                 "pass static=None")
            return None
        if static is None:
            raise ValueError(f"the model was trained with the static covariates "
                             f"{self.static_covariates_}: pass `static`, one row of {expected} "
                             f"value(s) per series (series {names[0]!r} first)")
        rows = np.asarray(static, dtype=np.float32)
        if rows.shape != (len(names), expected):
            raise ValueError(f"static covariates of shape {rows.shape}; expected (series, "
                             f"{self.static_covariates_}) = ({len(names)}, {expected})")
        bad = np.argwhere(~np.isfinite(rows))
        if len(bad):
            row, column = bad[0]
            raise ValueError(f"series {names[row]!r}: static covariate "
                             f"{self.static_covariates_[column]!r} is {rows[row, column]}; "
                             "values must be finite")
        return rows

    def _scale_covariates(self, values: np.ndarray) -> np.ndarray:
        """Known-future covariates in the units the network was trained on."""
        return (values - self.covariate_loc_) / self.covariate_scale_

    def _forecast(self, fh: ForecastingHorizon, X: pd.DataFrame | None
                  ) -> tuple[pd.Index, np.ndarray]:
        """Index of the forecast rows and quantiles (rows, levels) for the stored context."""
        steps = self._steps_of(fh)
        self._check_horizon(int(steps.max()))
        y, history_X = self._context_y, self._context_X
        multi = isinstance(y.index, pd.MultiIndex)
        if X is not None:
            validate_panel(X, 1, [*self.covariates_, *self.static_covariates_], name="X")
        indexes, histories, keys, known, statics = [], [], [], [], []
        for key, series in series_groups(y):
            # per series: ragged panels end at different times; sktime cannot infer a
            # frequency from a multi-index, the series' own index can
            freq = fh.freq or index_frequency(series.index)
            future_index = ForecastingHorizon(steps, freq=freq).to_absolute_index(
                series.index[[-1]])
            histories.append(series.iloc[:, 0].to_numpy(np.float32))
            if self.covariates_:
                # the network reads every step up to its horizon, not only the requested ones
                future_rows = ForecastingHorizon(range(1, self.horizon_ + 1), freq=freq
                                                 ).to_absolute_index(series.index[[-1]])
                known.append(np.concatenate([
                    self._x_rows(history_X, key, series.index, "X passed to fit",
                                 self.covariates_),
                    self._x_rows(X, key, future_rows, "X passed to predict", self.covariates_)]))
            if self.static_covariates_:
                statics.append(self._x_rows(history_X, key, series.index[:1], "X passed to fit",
                                            self.static_covariates_)[0])
            keys.append(key)
            levels = key if isinstance(key, tuple) else (key,)
            indexes.append(pd.MultiIndex.from_tuples([(*levels, t) for t in future_index])
                           if multi else future_index)
        quantiles = self.forecast_histories(
            histories, keys, covariates=known if self.covariates_ else None,
            static=np.stack(statics) if self.static_covariates_ else None)[:, steps - 1]
        index = indexes[0].append(indexes[1:]) if len(indexes) > 1 else indexes[0]
        if multi:
            index = index.set_names(y.index.names)
        return index, quantiles.reshape(-1, quantiles.shape[-1])  # (N * len(fh), Q)

    def _x_rows(self, X: pd.DataFrame | None, key: object, index: pd.Index, what: str,
                columns: list[str]) -> np.ndarray:
        """Raw values (rows, columns) of one series' covariates at the given times."""
        if X is None:
            raise ValueError(f"{what} is None, but the model was trained with covariates")
        frame = X.xs(key, level=list(range(X.index.nlevels - 1))) if key is not None else X
        missing = index.difference(frame.index)
        if len(missing):
            raise ValueError(f"{what} lacks rows of series {series_id(key)!r} at "
                             f"{list(missing[:3])}")
        return frame.loc[index, columns].to_numpy(np.float32)

    # ------------------------------------------------------------------ helpers
    def _horizon_of(self, fh: ForecastingHorizon, y: pd.DataFrame) -> int:
        steps = self._steps_of(fh)
        if (steps < 1).any():
            raise ValueError(f"fh must be out of sample (steps >= 1), got {list(steps)}")
        return int(steps.max())

    def _steps_of(self, fh: ForecastingHorizon) -> np.ndarray:
        return np.asarray(fh.to_relative(self.cutoff), dtype=np.int64)

    def _check_horizon(self, horizon: int) -> None:
        if horizon > self.horizon_:
            raise ValueError(
                f"fh reaches {horizon} steps ahead; the network was trained for {self.horizon_}"
            )

    def _quantile_position(self, level: float) -> int:
        return self.levels_.index(level)

    def _panel(self, y: pd.DataFrame, X: pd.DataFrame | None) -> Panel:
        """The training panel: target plus scaled covariates per series, and static rows."""
        _, targets = panel_arrays(y, [y.columns[0]])
        if X is None:
            return Panel(targets)
        arrays, statics = [], []
        for (key, series), target in zip(series_groups(y), targets, strict=True):
            known = self._x_rows(X, key, series.index, "X passed to fit", self.covariates_)
            arrays.append(np.concatenate([target, self._scale_covariates(known)], 1))
            statics.append(self._x_rows(X, key, series.index[:1], "X passed to fit",
                                        self.static_covariates_)[0])
        return Panel(arrays, np.stack(statics) if self.static_covariates_ else None)

    # ------------------------------------------------------------------ persistence
    def save_model(self, directory: str | Path) -> Path:
        """Write the trained network as ``weights.pt`` (tensors only) and ``config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: getattr(self, name) for name in TRAINED_ATTRIBUTES
                 if name not in ("network_", "history_")}
        state["covariate_loc_"] = self.covariate_loc_.tolist()
        state["covariate_scale_"] = self.covariate_scale_.tolist()
        config = {
            "class": type(self).__name__,
            "params": {k: v for k, v in self.get_params(deep=False).items() if k != "on_epoch"},
            "state": state,
            "history": [vars(r) for r in self.history_],
        }
        torch.save(self.network_.state_dict(), directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    def pretrained(self) -> NeuralForecaster:
        """This trained network as a new estimator in sktime's pretrained state, read back from
        its own ``save_model`` files (on the CPU, without the training callback): ``fit`` only
        sets its context and sktime's clone keeps the network, as for a loaded model."""
        self._check_trained()
        with tempfile.TemporaryDirectory(prefix="forecaster-pretrained-") as directory:
            return type(self).load_model(self.save_model(directory))

    @classmethod
    def load_model(cls, directory: str | Path) -> NeuralForecaster:
        """A pretrained estimator from ``save_model``'s files; ``fit`` then sets its context."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        classes = {c.__name__: c for c in ESTIMATORS}
        # JSON has no tuples; every list-valued parameter was a tuple
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in config["params"].items()}
        estimator = classes[config["class"]](**params)
        state = config["state"]
        for name, value in state.items():
            setattr(estimator, name, value)
        estimator.covariate_loc_ = np.asarray(state["covariate_loc_"], np.float32)
        estimator.covariate_scale_ = np.asarray(state["covariate_scale_"], np.float32)
        estimator.history_ = [EpochRecord(**r) for r in config["history"]]
        estimator.network_ = build_model(estimator._family, **estimator.model_kwargs_)
        weights = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        estimator.network_.load_state_dict(weights)
        estimator.network_.eval()
        estimator._pretrained_attrs = list(TRAINED_ATTRIBUTES)
        estimator._state = "pretrained"
        return estimator

    @classmethod
    def get_test_params(cls, parameter_set: str = "default") -> list[dict[str, Any]]:
        tiny = {"input_len": 8, "max_epochs": 2, "steps_per_epoch": 2, "batch_size": 16,
                "verbose": False}
        return [{**tiny, **p} for p in cls._tiny_variants()]

    @classmethod
    def _tiny_variants(cls) -> list[dict[str, Any]]:
        return [{}]


def _append(old: pd.DataFrame, new: pd.DataFrame | None) -> pd.DataFrame:
    """Rows of ``new`` added to ``old``; where both hold a timestamp, the new value wins."""
    if new is None:
        return old
    both = pd.concat([old, new])
    return both[~both.index.duplicated(keep="last")].sort_index()


def _store_params(self: NeuralForecaster, params: dict[str, Any]) -> None:
    """sktime convention: every constructor argument is kept, unchanged, as an attribute."""
    for name, value in params.items():
        if name not in ("self", "__class__"):
            setattr(self, name, value)
    BaseForecaster.__init__(self)
    self._y = self._X = None  # read by sktime if remember_data is switched back on


# --- docstrings: each estimator's numpydoc Parameters section is rendered from these
# (name: (type, description)), with the defaults of the class's own constructor, so that
# help(cls) shows every argument while the shared text has one home

_ParameterDocs = dict[str, tuple[str, str]]

_TRAINING_PARAMETERS: _ParameterDocs = {
    "input_len": ('int or "auto"',
                  "Steps of history the network reads; shorter histories are left-padded. "
                  '"auto": $input_seasons seasons or, if more, the whole seasons that cover '
                  "$input_horizons horizons; at most half the median series length of fit, and "
                  "at most what that series holds besides the horizon and the validation rows "
                  "(in whole seasons when that is a season or more; at least one step, and one "
                  "explicit segment or patch). See resolved_params; fit keeps the values it "
                  "chose as resolved_params_."),
    "season_length": ('int or "auto"',
                      'The seasonal period the "auto" sizes are counted in. "auto": the one the '
                      "frequency of fit's time index implies (hourly 24, daily 7, weekly 52, "
                      "monthly 12, quarterly 4; 1 for integer timestamps or dates without a "
                      "regular frequency)."),
    "quantiles": ("tuple of float", "Levels the network forecasts (0.5 is always added)."),
    "loss": ('{"pinball", "mae", "mse"}',
             'The pinball loss over the quantiles, or a point loss ("mae", "mse"): the quantiles '
             "then come from the validation errors."),
    "max_epochs": ("int", "Most epochs to train; early stopping may end sooner."),
    "steps_per_epoch": ("int", "Optimizer steps per epoch, each on a batch of random windows."),
    "batch_size": ("int", "Windows per optimizer step."),
    "learning_rate": ("float", "Peak learning rate of AdamW's one-cycle schedule."),
    "weight_decay": ("float", "AdamW's weight decay."),
    "patience": ("int", "Epochs without a better validation loss before training stops."),
    "validation_rows": ('int, "auto" or None',
                        "Trailing rows of each series held out for early stopping, at least the "
                        'horizon; "auto" (or None): the horizon.'),
    "refit_full": ('bool or "auto"',
                   "After early stopping, train again from the initial weights for the epochs "
                   "it chose, on training windows over every row, the validation rows included "
                   "(the name is AutoGluon's): those rows are each series' most recent values, "
                   'which no training window reaches otherwise. "auto": refit when the '
                   "validation rows are a tenth or more of the median series length of fit "
                   "(short series); see resolved_params. history_ is the early-stopped run's "
                   "curve; a point loss's quantiles come from its validation errors."),
    "min_history": ("int or None",
                    "Shortest usable history; None: input_len // 4 (at least 1), lowered to "
                    "the shortest series of fit, so that every fitted series can be forecast. "
                    "A value above the shortest series is refused at fit."),
    "static_covariates": ("sequence of str or None",
                          "Columns of X that are constant per series; the other columns of X "
                          "are known-future covariates."),
    "device": ("str", '"auto" (cuda, then mps, then cpu) or a torch device name.'),
    "random_state": ("int or None",
                     "Seed of the initial weights and the training windows; runs on the CPU "
                     "are deterministic."),
    "verbose": ("bool", "Show a progress bar while training."),
    "on_epoch": ("callable or None",
                 "Called with each epoch's EpochRecord (train and validation loss)."),
}


def _documented(network: _ParameterDocs
                ) -> Callable[[type[NeuralForecaster]], type[NeuralForecaster]]:
    """A class decorator: the ``$parameters`` of the class's docstring becomes a numpydoc
    Parameters section of ``network``'s and _TRAINING_PARAMETERS' entries, in the order of the
    constructor's arguments, each with its default there."""

    def document(cls: type[NeuralForecaster]) -> type[NeuralForecaster]:
        described = {**network, **_TRAINING_PARAMETERS}
        sizes = {"input_seasons": cls._input_seasons, "input_horizons": cls._input_horizons}
        lines = ["Parameters", "----------"]
        for name, parameter in inspect.signature(cls).parameters.items():
            if name in described:  # tests/test_estimators.py reports the undocumented ones
                kind, text = described[name][0], Template(described[name][1]).substitute(sizes)
                default = parameter.default
                shown = f'"{default}"' if isinstance(default, str) else repr(default)
                lines.append(f"{name} : {kind}, default={shown}")
                lines.append(textwrap.fill(text, 88, initial_indent=" " * 4,
                                           subsequent_indent=" " * 4))
        section = textwrap.indent("\n".join(lines), " " * 4).lstrip()
        cls.__doc__ = Template(cls.__doc__).substitute(parameters=section)
        return cls

    return document


# the families' "auto" sizes (NeuralForecaster._auto_rules), from the values resolved before
def _one_season(resolved: dict[str, int]) -> int:
    return min(resolved["season_length"], resolved["input_len"])


def _sixth_of_a_season(resolved: dict[str, int]) -> int:
    return max(1, min(resolved["season_length"] // 6, resolved["input_len"]))


def _half_a_patch(resolved: dict[str, int]) -> int:
    return max(1, resolved["patch_len"] // 2)


_RNN_PARAMETERS: _ParameterDocs = {
    "hidden_size": ("int", "Width of the recurrent layers."),
    "num_layers": ("int", "Stacked recurrent layers of the encoder (and of the seq2seq decoder)."),
    "dropout": ("float", "Dropout between the recurrent layers and in the MLP head."),
    "decoder": ('{"mlp", "seq2seq"}',
                "A head on the encoder's last hidden state, or a recurrent decoder over the "
                "horizon that reads the known-future covariates step by step."),
    "segment_len": ('int or "auto"',
                    "Time steps the encoder reads per recurrent step (1: the classic "
                    'step-by-step RNN); "auto": one season, at most input_len.'),
}


@_documented(_RNN_PARAMETERS)
class RNNForecaster(NeuralForecaster):
    """Elman RNN encoder with a direct multi-horizon decoder (MLP head or seq2seq RNN).

    $parameters

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from forecaster import RNNForecaster
    >>> model = RNNForecaster(input_len=24, max_epochs=1, steps_per_epoch=5, verbose=False)
    >>> model = model.fit(load_airline(), fh=[1, 2, 3])
    >>> model.predict().shape
    (3,)
    """

    _family = "rnn"
    _fixed_model_kwargs: ClassVar[dict[str, Any]] = {"cell": "rnn"}
    _model_params = ("hidden_size", "num_layers", "dropout", "decoder", "segment_len")
    _auto_rules: ClassVar[dict[str, Callable[[dict[str, int]], int]]] = {
        "segment_len": _one_season}
    _input_units = ("segment_len",)

    def __init__(self, hidden_size=128, num_layers=2, dropout=0.0, decoder="mlp",
                 segment_len=AUTO, input_len=AUTO, season_length=AUTO,
                 quantiles=DEFAULT_QUANTILES, loss="pinball", max_epochs=TRAINING.max_epochs,
                 steps_per_epoch=TRAINING.steps_per_epoch, batch_size=TRAINING.batch_size,
                 learning_rate=1e-2, weight_decay=TRAINING.weight_decay,
                 patience=TRAINING.patience, validation_rows=AUTO, refit_full=AUTO,
                 min_history=None, static_covariates=None, device="auto", random_state=0,
                 verbose=True, on_epoch=None):
        _store_params(self, locals())

    @classmethod
    def _tiny_variants(cls) -> list[dict[str, Any]]:
        return [{"hidden_size": 8, "num_layers": 1, "segment_len": 4},
                {"hidden_size": 8, "decoder": "seq2seq", "loss": "mae", "segment_len": 1}]


@_documented(_RNN_PARAMETERS)
class LSTMForecaster(RNNForecaster):
    """LSTM encoder with a direct multi-horizon decoder (MLP head or seq2seq LSTM).

    $parameters

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from forecaster import LSTMForecaster
    >>> model = LSTMForecaster(input_len=24, max_epochs=1, steps_per_epoch=5, verbose=False)
    >>> model = model.fit(load_airline(), fh=[1, 2, 3])
    >>> model.predict().shape
    (3,)
    """

    _fixed_model_kwargs: ClassVar[dict[str, Any]] = {"cell": "lstm"}


@_documented(_RNN_PARAMETERS)
class GRUForecaster(RNNForecaster):
    """GRU encoder with a direct multi-horizon decoder (MLP head or seq2seq GRU).

    $parameters

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from forecaster import GRUForecaster
    >>> model = GRUForecaster(input_len=24, max_epochs=1, steps_per_epoch=5, verbose=False)
    >>> model = model.fit(load_airline(), fh=[1, 2, 3])
    >>> model.predict().shape
    (3,)
    """

    _fixed_model_kwargs: ClassVar[dict[str, Any]] = {"cell": "gru"}


_TCN_PARAMETERS: _ParameterDocs = {
    "channels": ("int", "Channels of each residual block."),
    "num_layers": ("int", "Residual blocks; block i dilates its convolutions by 2**i."),
    "kernel_size": ("int", "Width of each causal convolution."),
    "dropout": ("float", "Dropout in the residual blocks and the head."),
    "segment_len": ('int or "auto"',
                    "Time steps read per position of the convolutions (1: one step each); "
                    '"auto": a sixth of a season (4 for hourly data), at least 1, at most '
                    "input_len."),
}


@_documented(_TCN_PARAMETERS)
class TCNForecaster(NeuralForecaster):
    """Temporal convolutional network: dilated causal convolutions in residual blocks.

    $parameters

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from forecaster import TCNForecaster
    >>> model = TCNForecaster(input_len=24, max_epochs=1, steps_per_epoch=5, verbose=False)
    >>> model = model.fit(load_airline(), fh=[1, 2, 3])
    >>> model.predict().shape
    (3,)
    """

    _family = "tcn"
    _model_params = ("channels", "num_layers", "kernel_size", "dropout", "segment_len")
    _auto_rules: ClassVar[dict[str, Callable[[dict[str, int]], int]]] = {
        "segment_len": _sixth_of_a_season}
    _input_units = ("segment_len",)

    def __init__(self, channels=32, num_layers=5, kernel_size=3, dropout=0.0, segment_len=AUTO,
                 input_len=AUTO, season_length=AUTO, quantiles=DEFAULT_QUANTILES,
                 loss="pinball", max_epochs=TRAINING.max_epochs,
                 steps_per_epoch=TRAINING.steps_per_epoch, batch_size=TRAINING.batch_size,
                 learning_rate=3e-3, weight_decay=TRAINING.weight_decay,
                 patience=TRAINING.patience, validation_rows=AUTO, refit_full=AUTO,
                 min_history=None, static_covariates=None, device="auto", random_state=0,
                 verbose=True, on_epoch=None):
        _store_params(self, locals())

    @classmethod
    def _tiny_variants(cls) -> list[dict[str, Any]]:
        return [{"channels": 8, "num_layers": 2, "segment_len": 2},
                {"channels": 4, "num_layers": 1, "loss": "mse", "segment_len": 1}]


@dataclass(frozen=True)
class Explanation:
    """Why one series' forecast looks the way it does (see ``explain_histories``).

    ``attention`` (horizon_, steps): row h is forecast step h + 1; column j is the
    ``steps - j``-th last value of the history (the last ``steps = min(len(history),
    input_len)`` values, oldest first). Each row sums to 1. ``covariate_importance``: each
    covariate's mean variable-selection weight, for a network that weighs its inputs and was
    trained with covariates; else None.
    """

    attention: np.ndarray
    covariate_importance: dict[str, float] | None


class AttentionMapsMixin:
    """Forecasters whose network has attention: ``attention_maps`` and ``explain_histories``
    explain a forecast."""

    def attention_maps(self, history: np.ndarray, covariates: np.ndarray | None = None,
                       static: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """The network's attention weights for one history (and its covariates, for a model
        trained with them), as ``forecast_histories`` would read it: module name -> (heads,
        queries, keys) weights. The Transformer has encoder self-attention, decoder
        self-attention and cross-attention; the hybrid one map from horizon steps to encoder
        segments, then to horizon steps."""
        self._check_trained()
        past, future = model_inputs(self._one_window(history, covariates, static),
                                    torch.device("cpu"))
        with _inference_lock(self.network_):
            maps = self.network_.cpu().attention_maps(past, future)
        return {name: weights[0].numpy() for name, weights in maps.items()}

    def explain_histories(self, histories: Sequence[np.ndarray],
                          ids: Sequence[object] | None = None, *,
                          covariates: Sequence[np.ndarray] | None = None,
                          static: Sequence[Sequence[float]] | np.ndarray | None = None
                          ) -> list[Explanation]:
        """The attention of each forecast step over the input time steps, per series: one
        forward pass for all series, inputs as ``forecast_histories`` takes them.

        The map is the network's last attention from the horizon steps to the history,
        averaged over heads (the Transformer: its last decoder layer's cross-attention; the
        hybrid: its attention over the encoder keys, renormalised), each input token's weight
        spread equally over the time steps it reads. Columns are the observed steps only: for
        a history shorter than ``input_len`` the weight on the left padding is left out and
        each row renormalised over the observed steps. A ValueError names a series none of
        whose observed steps any token reads.
        """
        self._check_trained()
        names = list(range(len(histories))) if ids is None else list(ids)
        windows = self._forecast_windows(histories, ids, covariates, static)
        with _inference_lock(self.network_):
            device = self._network_device()
            past, future = model_inputs(windows, device)
            self.network_.eval()
            with autocast(device):
                explained = self.network_.explain(past, future)
        attention = explained["attention"].float().cpu().numpy()  # (N, H, input_len)
        observed = windows.past[:, :, 1].sum(axis=1).astype(int)  # left padding: the last ones
        importances = self._covariate_importances(explained) or [None] * len(names)
        return [Explanation(_observed_attention(weights, steps, name), importance)
                for weights, steps, name, importance in zip(attention, observed, names,
                                                            importances, strict=True)]

    def _covariate_importances(self, explained: dict[str, torch.Tensor]
                               ) -> list[dict[str, float]] | None:
        """Each series' covariate -> mean variable-selection weight over the input and the
        horizon steps, from a network that reports the weights (``past`` and ``future``);
        None for a model without covariates or a network that does not weigh its inputs."""
        names = [*self.covariates_, *self.static_covariates_]
        if not names or "past" not in explained:
            return None
        past = explained["past"][:, :, 2:].float().mean(dim=1)  # after the target and its mask
        future = explained["future"].float().mean(dim=1)
        both = ((past + future) / 2).cpu().numpy()
        return [{name: float(w) for name, w in zip(names, row, strict=True)} for row in both]

    def _one_window(self, history: np.ndarray, covariates: np.ndarray | None,
                    static: Sequence[float] | None) -> Windows:
        return self._forecast_windows([history], None,
                                      None if covariates is None else [covariates],
                                      None if static is None else [static])


def _observed_attention(weights: np.ndarray, steps: int, name: object) -> np.ndarray:
    """A (horizon, input_len) map cut to its last ``steps`` columns, the observed ones, each
    row renormalised over them."""
    kept = weights[:, weights.shape[1] - steps:]
    total = kept.sum(axis=1, keepdims=True)
    if not (total > 0).all():
        raise ValueError(f"series {name!r}: the model's attention reads none of its {steps} "
                         "observed values (only the padding before them); send a longer "
                         "history")
    return kept / total


_TRANSFORMER_PARAMETERS: _ParameterDocs = {
    "encoder": ('{"patch", "timestep"}',
                "One input token per patch of patch_len steps, taken every patch_stride steps "
                "(as in PatchTST), or one per time step."),
    "patch_len": ('int or "auto"', 'Time steps per patch; "auto": one season, at most input_len.'),
    "patch_stride": ('int or "auto"',
                     'Time steps between the starts of two patches; "auto": half the patch '
                     "length, at least 1."),
    "d_model": ("int", "Width of the tokens."),
    "n_heads": ("int", "Attention heads; they must divide d_model."),
    "encoder_layers": ("int", "Encoder layers (self-attention over the input tokens)."),
    "decoder_layers": ("int",
                       "Decoder layers (masked self-attention over the horizon steps, "
                       "cross-attention to the input tokens)."),
    "dropout": ("float", "Dropout on the outputs of the attention and feed-forward blocks."),
    "positional_encoding": ('{"sinusoidal", "learned"}',
                            "The paper's fixed sinusoids, or learned position embeddings."),
}


@_documented(_TRANSFORMER_PARAMETERS)
class TransformerForecaster(AttentionMapsMixin, NeuralForecaster):
    """Encoder-decoder Transformer ("Attention Is All You Need") with a PatchTST-style encoder.

    ``attention_maps`` returns the attention weights for interpretation.

    $parameters

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from forecaster import TransformerForecaster
    >>> model = TransformerForecaster(input_len=24, patch_len=4, patch_stride=4, max_epochs=1,
    ...                               steps_per_epoch=5, verbose=False)
    >>> model = model.fit(load_airline(), fh=[1, 2, 3])
    >>> model.predict().shape
    (3,)
    """

    _family = "transformer"
    _model_params = ("encoder", "patch_len", "patch_stride", "d_model", "n_heads",
                     "encoder_layers", "decoder_layers", "dropout", "positional_encoding")

    # patches make a long input cheap: twice the other families'. And attention learns more
    # slowly than recurrence: max_epochs is 45, not 30 (M4 Hourly OWA 0.440 -> 0.421 at seed 0;
    # the recurrent families gain little and the GRU loses at 60, docs/benchmarks.md)
    _input_seasons, _input_horizons = 14, 4
    _auto_rules: ClassVar[dict[str, Callable[[dict[str, int]], int]]] = {
        "patch_len": _one_season, "patch_stride": _half_a_patch}
    _input_units = ("patch_len",)

    def __init__(self, encoder="patch", patch_len=AUTO, patch_stride=AUTO, d_model=32,
                 n_heads=4, encoder_layers=2, decoder_layers=1, dropout=0.0,
                 positional_encoding="sinusoidal", input_len=AUTO, season_length=AUTO,
                 quantiles=DEFAULT_QUANTILES, loss="pinball", max_epochs=45,
                 steps_per_epoch=TRAINING.steps_per_epoch, batch_size=TRAINING.batch_size,
                 learning_rate=3e-3, weight_decay=TRAINING.weight_decay,
                 patience=TRAINING.patience, validation_rows=AUTO, refit_full=AUTO,
                 min_history=None, static_covariates=None, device="auto", random_state=0,
                 verbose=True, on_epoch=None):
        _store_params(self, locals())

    @classmethod
    def _tiny_variants(cls) -> list[dict[str, Any]]:
        return [{"d_model": 8, "n_heads": 2, "encoder_layers": 1, "patch_len": 4,
                 "patch_stride": 2},
                {"d_model": 8, "n_heads": 2, "encoder_layers": 1, "encoder": "timestep",
                 "positional_encoding": "learned", "loss": "mae"}]


_HYBRID_PARAMETERS: _ParameterDocs = {
    "cell": ('{"lstm", "gru"}', "The recurrent cell of the encoder and the decoder."),
    "d_model": ("int", "Width of the embedded inputs, the recurrent states and the attention."),
    "n_heads": ("int", "Attention heads; they must divide d_model."),
    "num_layers": ("int", "Stacked recurrent layers of the encoder and of the decoder."),
    "segment_len": ('int or "auto"',
                    "Time steps the encoder reads per recurrent step (1: step by step); each "
                    'segment is one key of the attention. "auto": one season, at most '
                    "input_len."),
    "dropout": ("float", "Dropout inside the gated residual networks and the attention."),
}


@_documented(_HYBRID_PARAMETERS)
class HybridForecaster(AttentionMapsMixin, NeuralForecaster):
    """Recurrent + attention hybrid after the Temporal Fusion Transformer (Lim et al., 2021).

    A recurrent encoder over segments of the history and a recurrent decoder over the
    known-future inputs, gated residual networks, variable selection over every input, and
    interpretable multi-head attention (heads share values) from each horizon step over the
    encoded history. ``attention_maps`` returns the attention; ``covariate_importance`` the
    variable-selection weight of each covariate.

    $parameters

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from forecaster import HybridForecaster
    >>> model = HybridForecaster(input_len=24, segment_len=4, max_epochs=1, steps_per_epoch=5,
    ...                          verbose=False)
    >>> model = model.fit(load_airline(), fh=[1, 2, 3])
    >>> model.predict().shape
    (3,)
    """

    _family = "hybrid"
    _model_params = ("cell", "d_model", "n_heads", "num_layers", "segment_len", "dropout")

    _auto_rules: ClassVar[dict[str, Callable[[dict[str, int]], int]]] = {
        "segment_len": _one_season}
    _input_units = ("segment_len",)

    def __init__(self, cell="lstm", d_model=32, n_heads=4, num_layers=1, segment_len=AUTO,
                 dropout=0.1, input_len=AUTO, season_length=AUTO, quantiles=DEFAULT_QUANTILES,
                 loss="pinball", max_epochs=TRAINING.max_epochs,
                 steps_per_epoch=TRAINING.steps_per_epoch, batch_size=TRAINING.batch_size,
                 learning_rate=3e-3, weight_decay=TRAINING.weight_decay,
                 patience=TRAINING.patience, validation_rows=AUTO, refit_full=AUTO,
                 min_history=None, static_covariates=None, device="auto", random_state=0,
                 verbose=True, on_epoch=None):
        _store_params(self, locals())

    def covariate_importance(self, history: np.ndarray, covariates: np.ndarray | None = None,
                             static: Sequence[float] | None = None) -> dict[str, float]:
        """Each covariate's mean variable-selection weight over the input steps and the
        horizon steps, for one history and its covariates (as ``attention_maps`` takes them).
        The target and its observed mask take the rest of each step's weight, so the values
        sum to at most 1."""
        explanation, = self.explain_histories(
            [history], covariates=None if covariates is None else [covariates],
            static=None if static is None else [static])
        return explanation.covariate_importance or {}

    @classmethod
    def _tiny_variants(cls) -> list[dict[str, Any]]:
        return [{"d_model": 8, "n_heads": 2, "segment_len": 4},
                {"d_model": 8, "n_heads": 2, "cell": "gru", "segment_len": 1, "loss": "mae"}]


ESTIMATORS = (RNNForecaster, LSTMForecaster, GRUForecaster, TCNForecaster, TransformerForecaster,
              HybridForecaster)


def explains(estimator: object) -> bool:
    """Whether an estimator (or class) explains its forecasts with attention: the capability
    that ``explain_histories`` states."""
    return hasattr(estimator, "explain_histories")


def explaining_families() -> list[str]:
    """The estimator classes of ``ESTIMATORS`` that explain their forecasts."""
    return [cls.__name__ for cls in ESTIMATORS if explains(cls)]
