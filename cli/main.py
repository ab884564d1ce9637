"""The ``forecaster`` command line: race models into MLflow, retrain on a schedule, serve the
champion over HTTP, draw what a model's forecast attends to, benchmark."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from pipelines.api_token import TOKEN_VARIABLE
from pipelines.execution import ClusterLost
from pipelines.schedule import PUSH_JOB, RunAtStart
from pipelines.signing import KEY_VARIABLE
from pipelines.warning_capture import without_sktime_notice
from serving.config import ENV_PREFIX, ServingConfig

PUSHGATEWAY_VARIABLE = "PUSHGATEWAY_URL"
RAY_HELP = ("run every fit as a Ray task (execution.engine: ray, over the config): on the "
            "cluster at ADDRESS (auto, HOST:PORT, or ray://HOST:10001 from outside the "
            "cluster), else the one in $RAY_ADDRESS, else a Ray started in this process on "
            "this machine's cores")

EXAMPLES = """\
examples:
  forecaster train configs/quick.yaml        race the demo's candidates, promote the best
  forecaster train --ray auto configs/m4_hourly.yaml   the same race as tasks on a Ray cluster
  forecaster models --name m4-hourly-quick   registered versions, champion and challenger
  forecaster serve --port 3000               serve m4-hourly-quick@champion (Swagger UI at /)
  forecaster serve --model-name m4-hourly --alias challenger
  forecaster schedule --run-at-start configs/m4_hourly.yaml --cron "0 3 * * *"
  curl -X POST localhost:9101/retrain        that scheduler: a race now (or coalesced)
  forecaster explain configs/quick.yaml --series history.csv --out heatmap.png
  forecaster bench m4-hourly --models LSTM Theta --seeds 3
"""


def _environment_help() -> str:
    # the fields with an alias are read from MLflow's own variables, listed apart
    settings = textwrap.fill(", ".join(ENV_PREFIX + name.upper()
                                       for name, field in ServingConfig.model_fields.items()
                                       if field.validation_alias is None),
                             width=90, initial_indent="    ", subsequent_indent="    ")
    return f"""\
environment:
  MLFLOW_TRACKING_URI   where races track runs and register models, and where `serve` and
                        `models` read them (default: sqlite:///mlflow.db in the working
                        directory, artifacts in ./mlartifacts)
  MLFLOW_REGISTRY_URI   the model registry, if not the tracking store
  {ENV_PREFIX}*          the service's settings (`serve`), over its --config file:
{settings}
  {PUSHGATEWAY_VARIABLE}       the Prometheus Pushgateway `schedule` and `train` push to
  {KEY_VARIABLE}
                        the key of the HMAC with which races sign the models they register,
                        and `serve` and `export-bento` check them (unset: a model's files are
                        checked against their digest only, and loads are unsigned)
  {TOKEN_VARIABLE}  the bearer token that POST /actuals (`serve`) and POST /retrain
                        (`schedule`) ask for (unset: none asked, and both say so at start)
  RAY_ADDRESS           the Ray cluster of `train --ray` and `schedule --ray`
  FORECASTER_DATA_DIR   the folder of the reference data sets (m4/, ett/) for `bench`
                        (default: ../shared/data beside the checkout)
"""


class _RunAtStartAction(argparse.Action):
    """``--run-at-start [MODE]``: bare, it means "always". argparse hands this flag the word
    after it, so ``--run-at-start CONFIG`` would read the config as a mode: a word that is
    no mode is the positional config instead."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | None, option_string: str | None = None) -> None:
        modes = [mode.value for mode in RunAtStart]
        if values is not None and values not in modes:
            if getattr(namespace, "config", None) is not None:
                parser.error(f"argument {option_string}: invalid choice: {values!r} (choose "
                             f"from {', '.join(modes)})")
            namespace.config = Path(values)
            values = None
        setattr(namespace, self.dest, values or self.const)


class _ConfigAction(argparse.Action):
    """The positional config, which ``--run-at-start`` may have taken already."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Path | None, option_string: str | None = None) -> None:
        if values is None:  # absent: argparse reports the default, which must not overwrite
            return
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"unrecognized arguments: {values}")
        setattr(namespace, self.dest, values)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _bench(args: argparse.Namespace) -> None:
    from forecaster.benchmark import bench_etth1, bench_m4_hourly, check_rows
    from forecaster.datasets import default_data_dir

    try:
        check_rows(args.dataset, args.models or [])
    except ValueError as error:
        args.parser.error(f"--models: {error}")
    data_dir = args.data_dir or default_data_dir()
    # the baselines build a sktime forecaster per series, each with its remember_data notice
    with without_sktime_notice():
        if args.dataset == "m4-hourly":
            table = bench_m4_hourly(data_dir / "m4", args.models, args.seeds)
        else:
            horizons = tuple(args.horizons or (96, 336))
            table = bench_etth1(data_dir / "ett" / "ETTh1.csv", horizons, args.models,
                                args.seeds)
    # the number of runs is a count (tabulate would print it as 3.000); the index comes first
    print(table.to_markdown(floatfmt=["", *(".0f" if column == "runs" else ".3f"
                                            for column in table.columns)]))


def _quiet_mlflow() -> None:
    """Keep the console for our progress bars and table: MLflow's own chatter (registration
    notices, artifact download bars) goes below WARNING."""
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow's sampler thread and urllib3's retries warn while the tracking server does not
    # answer: the race says so itself, in one line
    for chatty in ("mlflow.system_metrics", "urllib3.connectionpool"):
        logging.getLogger(chatty).setLevel(logging.ERROR)


def _train(args: argparse.Namespace) -> None:
    from pipelines.config import load_config
    from pipelines.race import format_leaderboard, run_race
    from pipelines.schedule import Interrupted, interrupt_on_signals, train_once
    from pipelines.tracking import TrackingUnavailable

    # fails here, naming the key, before anything trains
    config = load_config(args.config, ray=args.ray)
    _quiet_mlflow()
    try:
        with interrupt_on_signals():  # SIGTERM too: the race marks its runs KILLED
            if args.pushgateway:
                result = train_once(args.config, args.pushgateway, args.push_job,
                                    ray=args.ray)
            else:
                result = run_race(config, progress=not args.no_progress)
    except TrackingUnavailable as error:
        sys.exit(f"forecaster train: {error}")
    except Interrupted as error:
        print(f"forecaster train: {error}: the race's runs are marked KILLED, the aliases are "
              "untouched", file=sys.stderr)
        sys.exit(error.exit_code)
    print(format_leaderboard(result))


def _models(args: argparse.Namespace) -> None:
    import mlflow

    from pipelines.config import TrackingConfig, TrackingEnvironment
    from pipelines.registry import list_versions

    _quiet_mlflow()
    tracking = TrackingConfig().model_copy(
        update=TrackingEnvironment().model_dump(exclude_none=True))
    uri = args.tracking_uri or tracking.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # listing must not create an empty store where there was none
        raise FileNotFoundError(f"no tracking store at {uri} (run `forecaster train` first, "
                                "or pass --tracking-uri)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(tracking.registry_uri or uri)
    table = list_versions(args.name)
    if table.empty:
        print("no registered models" + (f" named {args.name!r}" if args.name else ""))
        return
    print(table.to_markdown(index=False, floatfmt=".4f"))


def _schedule(args: argparse.Namespace) -> None:
    import logging

    if args.config is None:
        args.usage_error("the following arguments are required: config")

    from pipelines.schedule import schedule_command

    # a long-running service: its log is its only account of what it did
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    schedule_command(args.config, args.cron, timezone=args.timezone,
                     metrics_port=args.metrics_port, metrics_addr=args.metrics_addr,
                     pushgateway=args.pushgateway, push_job=args.push_job,
                     run_at_start=args.run_at_start, ray=args.ray)


def _serve(args: argparse.Namespace) -> None:
    from serving.serve_command import serve

    serve(args.host, args.port, config=args.config, first_forecast=args.first_forecast,
          model_name=args.model_name, alias=args.alias)


def _explain(args: argparse.Namespace) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    from forecaster.data import SERIES
    from pipelines.explain import explain_series, model_uri, read_series
    from pipelines.forecasts import POINT
    from pipelines.tracking import explanation_figure

    _quiet_mlflow()
    uri = model_uri(args.model, args.alias)
    frame = read_series(args.series)  # before the model loads: a wrong file fails fast
    try:
        wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except MlflowException as error:
        raise ValueError(f"cannot load {uri}: {error.message}") from None
    series_id = args.id if args.id is not None else str(frame[SERIES].iloc[0])
    horizon = args.horizon or wrapper.horizon
    explained = explain_series(wrapper.estimator, frame, series_id, horizon, wrapper.frequency,
                               wrapper.known_future, wrapper.static)
    attention = explained.explanation.attention[:horizon]
    figure = explanation_figure(explained.history, explained.forecast, attention,
                                importance=explained.explanation.covariate_importance,
                                title=f"{uri}: series {explained.series_id}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=args.dpi)
    mean = attention.mean(axis=0)
    steps = attention.shape[1]
    top = ", ".join(f"{steps - p} back ({mean[p]:.3f})" for p in mean.argsort()[::-1][:5])
    print(f"{args.out}: series {explained.series_id}, {horizon} forecast steps x {steps} input "
          f"steps; most attended: {top}; first forecast {explained.forecast[POINT].iloc[0]:.4g}")


def _export_bento(args: argparse.Namespace) -> None:
    from serving.export import export_bento

    _quiet_mlflow()
    print(export_bento(args.name, args.alias, args.tracking_uri))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forecaster", description=__doc__,
                                     epilog=EXAMPLES + "\n" + _environment_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="train and score models on a reference data set")
    bench.add_argument("dataset", choices=["m4-hourly", "etth1"])
    bench.add_argument("--data-dir", type=Path,
                       help="folder holding m4/ and ett/ (default: $FORECASTER_DATA_DIR, "
                            "else ../shared/data beside the checkout)")
    bench.add_argument("--models", nargs="+",
                       help="subset of model names (default: all); Ensemble weighs the networks "
                            "named with it")
    bench.add_argument("--horizons", nargs="+", type=int, help="ETTh1 horizons (default 96 336)")
    bench.add_argument("--seeds", type=_positive_int, default=1,
                       help="fit each network with seeds 0 .. N-1 and report the median of "
                            "each column (default 1: seed 0, the models' default)")
    bench.set_defaults(run=_bench, parser=bench)

    train = commands.add_parser(
        "train", help="run one race now: backtest, track, register, promote the best",
        description="Run one race now: backtest every candidate of CONFIG on the same folds, "
                    "refit each on all the data, and promote the best to the alias champion "
                    "if it beats the current one.",
        epilog="Where the results go: runs (parameters, per-fold metrics, learning curves, "
               "plots, the leaderboard) to the MLflow tracking store, in an experiment named "
               "after the race; each candidate's model to the model registry as a new version "
               "of registry.model_name, its metrics as tags; the winner gets the alias "
               "champion (else challenger). The store is the config's tracking.tracking_uri, "
               "overridden by $MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db in the "
               "working directory, artifacts in ./mlartifacts); the registry is "
               "$MLFLOW_REGISTRY_URI or tracking.registry_uri, else the tracking store. "
               "`forecaster models` lists the versions; `forecaster serve` serves the "
               "champion.")
    train.add_argument("config", type=Path, help="race config (YAML), e.g. configs/quick.yaml")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=RAY_HELP)
    train.add_argument("--pushgateway", default=os.environ.get(PUSHGATEWAY_VARIABLE),
                       help="push the training metrics of `forecaster schedule` to this "
                            "Pushgateway when the race ends, e.g. for a CronJob "
                            "(default: $PUSHGATEWAY_URL, else none)")
    train.add_argument("--push-job", default=PUSH_JOB,
                       help="job name of the pushed metrics")
    train.set_defaults(run=_train)

    models = commands.add_parser(
        "models", help="list registered versions, their metrics, champion and challenger")
    models.add_argument("--name", help="registered model name (default: every model)")
    models.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///mlflow.db in the working directory)")
    models.set_defaults(run=_models)

    schedule = commands.add_parser(
        "schedule", help="retrain on a cron schedule (long-running), with Prometheus metrics",
        description="Retrain on a cron schedule, one race at a time: a long-running process "
                    "serving /metrics and POST /retrain on --metrics-port. POST /retrain "
                    "runs a race now (202 {\"started\": true}), or, while one runs, is "
                    "coalesced into it (202 {\"started\": false, \"coalesced\": true}); "
                    "its body is ignored, so an Alertmanager webhook can call it. With "
                    f"${TOKEN_VARIABLE} set it needs 'Authorization: Bearer TOKEN' (else 401).")
    schedule.add_argument("config", type=Path, nargs="?", action=_ConfigAction,
                          help="race config (YAML), read again at each run")
    schedule.add_argument("--cron", default="0 3 * * *",
                          help='five-field crontab expression (default: "0 3 * * *")')
    schedule.add_argument("--timezone", default="UTC", help="time zone of --cron (default UTC)")
    schedule.add_argument("--metrics-port", type=int, default=9101,
                          help="port of /metrics and POST /retrain (default 9101)")
    schedule.add_argument("--metrics-addr", default="0.0.0.0",
                          help="address that port binds (default 0.0.0.0)")
    schedule.add_argument("--pushgateway", default=os.environ.get(PUSHGATEWAY_VARIABLE),
                          help="Prometheus Pushgateway to push the metrics to after each run, "
                               "e.g. pushgateway:9091 (default: $PUSHGATEWAY_URL, else none)")
    schedule.add_argument("--push-job", default=PUSH_JOB,
                          help="job name of the pushed metrics")
    schedule.add_argument("--run-at-start", nargs="?", action=_RunAtStartAction,
                          const=RunAtStart.ALWAYS.value, default=RunAtStart.NEVER.value,
                          metavar="{" + ",".join(mode.value for mode in RunAtStart) + "}",
                          help="train once at start: bare flag = always; if-no-champion trains "
                               "only while the registry has no champion (default: never)")
    schedule.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=RAY_HELP)
    schedule.set_defaults(run=_schedule, usage_error=schedule.error)

    serve = commands.add_parser(
        "serve", help="serve the registry's champion over HTTP (BentoML), following its alias")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    serve.add_argument("--config", type=Path,
                       help="serving config (YAML); the environment overrides it "
                            "(FORECASTER_*, MLFLOW_TRACKING_URI)")
    serve.add_argument("--model-name", help="registered model to serve, over the config and "
                                            "$FORECASTER_MODEL_NAME (default m4-hourly-quick)")
    serve.add_argument("--alias", help="its alias to follow, over the config and "
                                       "$FORECASTER_MODEL_ALIAS (default champion)")
    serve.add_argument("--first-forecast", type=Path, metavar="RACE_CONFIG",
                       help="once ready, forecast the first series of this race config's data "
                            "and print it with the curl command that does the same")
    serve.set_defaults(run=_serve)

    explain = commands.add_parser(
        "explain", help="draw one series' forecast above the attention behind it (PNG)",
        description="Draw the forecast of one series above the heat map of its attention: a "
                    "row per forecast step, a column per input time step (each row sums to 1), "
                    "as POST /explain answers. For a network with attention; any other model is "
                    "refused, naming the families that have it.")
    explain.add_argument("model", metavar="CONFIG-or-MODEL-URI",
                         help="a race config (YAML: its registered model at --alias, in its "
                              "tracking store) or a model URI (models:/NAME@ALIAS, "
                              "models:/NAME/VERSION, runs:/RUN/model, a folder)")
    explain.add_argument("--series", type=Path, required=True, metavar="FILE",
                         help="CSV or Parquet in the model's input layout: series_id, "
                              "timestamp, target (and the model's covariates)")
    explain.add_argument("--out", type=Path, required=True, metavar="PNG",
                         help="where to write the figure")
    explain.add_argument("--id", help="the series to explain (default: the file's first)")
    explain.add_argument("--horizon", type=int,
                         help="forecast steps to draw (default: the model's horizon)")
    explain.add_argument("--alias", default="champion",
                         help="with a CONFIG, the alias of its registered model (default "
                              "champion)")
    explain.add_argument("--dpi", type=int, default=120, help="resolution (default 120)")
    explain.set_defaults(run=_explain)

    export = commands.add_parser(
        "export-bento", help="pin the current champion in a Bento that does not follow the "
                             "registry")
    export.add_argument("--name", help="registered model (default: the serving config's)")
    export.add_argument("--alias", help="alias to pin (default: the serving config's)")
    export.add_argument("--tracking-uri", help="MLflow tracking URI (default: the serving "
                                               "config's, e.g. $MLFLOW_TRACKING_URI)")
    export.set_defaults(run=_export_bento)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, ClusterLost) as error:
        sys.exit(f"forecaster {args.command}: {error}")


if __name__ == "__main__":
    main()
