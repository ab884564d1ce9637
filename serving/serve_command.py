"""``forecaster serve``: run ``bentoml serve`` on the service with the resolved settings.

``bentoml serve`` runs through this module (``python -m serving.serve_command``): each server
gets a Prometheus multiprocess folder of its own, removed when it exits. BentoML's default is
one folder per BENTOML_HOME, which every ``bentoml serve`` empties as it starts: a second server
on the host wiped the first one's metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from serving.config import CONFIG_FILE_VARIABLE, ENV_PREFIX, load_serving_config
from serving.first_forecast import (
    curl_command,
    example_request,
    get,
    post,
    top_inputs_summary,
    wait_until_ready,
)

SERVICE = "serving.service:Forecaster"


def serve(host: str, port: int, config: Path | None = None,
          first_forecast: Path | None = None, model_name: str | None = None,
          alias: str | None = None) -> None:
    """Serve in the foreground until Ctrl-C; with ``first_forecast``, also post and print one
    forecast once the service is ready and, for a model that explains, the inputs its
    attention weighed most. ``model_name`` and ``alias`` override the settings'. Bad settings
    fail here, before BentoML starts."""
    env = dict(os.environ)
    if config is not None:
        env[CONFIG_FILE_VARIABLE] = str(Path(config).resolve())
    settings = load_serving_config(env.get(CONFIG_FILE_VARIABLE))
    # the environment beats the config file (serving.config); these arguments beat both
    overrides = {"model_name": model_name, "model_alias": alias}
    for field, value in overrides.items():
        if value is not None:
            env[f"{ENV_PREFIX}{field.upper()}"] = value
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # the workers may run elsewhere: pin the embedded store to this directory
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    command = [sys.executable, "-m", "serving.serve_command", SERVICE, "--host", host,
               "--port", str(port)]
    if first_forecast is None:
        os.execvpe(command[0], command, env)  # BentoML owns the process and its signals
    body = _example_body(first_forecast)
    server = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, alive=lambda: server.poll() is None)
        print(f"\nfirst forecast of {settings.model_name}@{settings.model_alias}:\n"
              f"{curl_command(url, body)}\n", flush=True)
        print(json.dumps(post(url, "/forecast", body)), flush=True)
        if get(url, "/model")["explains"]:  # a network with attention: why it forecast so
            print(f"\nthe inputs its attention weighed most (mean over the horizon):\n"
                  f"{top_inputs_summary(post(url, '/explain', body))}\n"
                  f"the whole map: {curl_command(url, body, '/explain')}", flush=True)
        print(f"\nserving on {url} (Swagger UI at {url}/); Ctrl-C stops", flush=True)
        server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        server.wait()
    except BaseException:
        server.terminate()
        server.wait()
        raise


def _example_body(race_config: Path) -> dict:
    from pipelines.config import load_config
    from pipelines.sources import load_race_data

    config = load_config(race_config)
    data = load_race_data(config.data)
    return example_request(data.long, config.horizon, config.frequency)


def bentoml_serve(arguments: list[str]) -> None:
    """``bentoml serve ARGUMENTS`` in this process, with a Prometheus multiprocess folder of
    its own (the workers get it from BentoML as PROMETHEUS_MULTIPROC_DIR), removed when the
    server exits, however it exits short of SIGKILL."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.cli import cli

    folder = tempfile.mkdtemp(prefix="forecaster-prometheus-")
    BentoMLContainer.prometheus_multiproc_dir.set(folder)
    print(f"Prometheus multiprocess folder: {folder}", file=sys.stderr, flush=True)
    try:
        cli.main(args=["serve", *arguments], prog_name="bentoml")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    bentoml_serve(sys.argv[1:])
