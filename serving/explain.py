"""POST /explain as plain functions, tested without a server.

    prepare_explanation  a parsed /forecast body checked as /forecast checks it, for a model
                         that explains                                    -> PreparedRequest
    explain_forward      the series of many requests, one forward pass per model -> explanations
    render_explanations  a request's explanations                         -> response JSON

The body is /forecast's: ``horizon`` is the number of rows of each map, ``quantiles`` are
checked and otherwise unused. A model states whether it explains (``ServedModel.explain``);
one that cannot gets a RequestError naming the families that can, from the estimators of
``forecaster.estimators``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydantic_core

from forecaster.estimators import explaining_families
from serving.inference import (
    Item,
    ModelOutputError,
    PreparedRequest,
    RequestError,
    forward,
    prepare,
    step_times,
)
from serving.model import Explanations, ServedModel
from serving.schemas import ForecastRequest

TOP_INPUTS = 5  # input steps listed in top_inputs


def prepare_explanation(request: ForecastRequest, model: ServedModel, max_series: int
                        ) -> PreparedRequest:
    """``prepare`` for a model that explains; RequestError for one that cannot."""
    if model.explain is None:
        info = model.info
        raise RequestError((), "model_cannot_explain",
                           f"model {info.name} v{info.version} ({info.model_class}) has no "
                           "attention to explain its forecasts with; the families that explain "
                           f"are {', '.join(explaining_families())}")
    return prepare(request, model, max_series)


def explain_forward(jobs: Sequence[Sequence[Item]]) -> list[Explanations]:
    """The explanations of the queued series of many requests, batched as ``forward``
    batches forecasts: one forward pass per distinct model."""
    return forward(jobs, call=lambda model, inputs: model.explain(inputs))


def render_explanations(request: ForecastRequest, prepared: PreparedRequest,
                        explanations: Explanations) -> bytes:
    """The response JSON: per series its attention map cut to the requested horizon, the
    times of its columns (with ``start`` and ``freq``), its most-attended input steps and,
    when the model has them, its covariates' importance. A series the model could not
    explain raises RequestError; a map with non-finite weights, ModelOutputError."""
    info, horizon = prepared.model.info, prepared.horizon
    entries = []
    for i, (series, explanation) in enumerate(zip(request.series, explanations, strict=True)):
        if isinstance(explanation, Exception):
            raise RequestError(("series", i, "values"), "model_failed",
                               f"series {series.id!r} could not be explained: {explanation}")
        attention = explanation.attention[:horizon]  # (horizon, steps)
        if not np.isfinite(attention).all():
            raise ModelOutputError(prepared.model, i, series.id)
        steps = attention.shape[1]
        times = None if series.start is None else \
            step_times(series.start, series.freq, len(series.values) - steps, steps,
                       ("series", i))
        mean = attention.mean(axis=0)
        top = []
        for position in np.argsort(-mean, kind="stable")[:TOP_INPUTS]:
            weight = {"position": int(position), "lag": int(steps - position)}
            if times is not None:
                weight["timestamp"] = times[position]
            top.append(weight | {"weight": float(mean[position])})
        entry = {"id": series.id, "attention": attention.tolist()}
        if times is not None:
            entry["input_timestamps"] = times
        entry["top_inputs"] = top
        if explanation.covariate_importance:
            entry["covariate_importance"] = explanation.covariate_importance
        entries.append(entry)
    body = {"model": {"name": info.name, "version": info.version, "alias": info.alias},
            "explanations": entries}
    return pydantic_core.to_json(body)
