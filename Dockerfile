# syntax=docker/dockerfile:1
# The forecaster image: the `forecaster` command (train, schedule, serve), the MLflow server with
# its basic-auth app, psycopg2, boto3 and Ray. One image runs the trainer, the Ray nodes of its
# races, the forecast service and the MLflow server of docker-compose.yml and deploy/k8s.
#
#   docker build -t forecaster:latest .                                         # CPU torch
#   docker build --build-arg TORCH_VARIANT=cuda -t forecaster:latest-cuda .     # CUDA torch
#
# The CUDA variant keeps the slim base: the torch wheels of the cu12x index carry the CUDA
# runtime libraries (as nvidia-* wheels); the host's driver comes in through the NVIDIA
# container toolkit. BASE_IMAGE may still name an nvidia/cuda runtime image with Python 3.11.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index: the plain PyPI `torch` would be the multi-GB CUDA build even
# for the CPU image. constraints.txt pins torch==2.13.0, which a +cpu/+cu128 local version meets.
RUN case "$TORCH_VARIANT" in \
        cpu) index="$TORCH_CPU_INDEX_URL" ;; \
        cuda) index="$TORCH_CUDA_INDEX_URL" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "$index" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
# the dependencies in a layer of their own, rebuilt only when these files change: an empty
# skeleton of the packages is all pip needs to resolve them
RUN for package in forecaster pipelines serving cli; do \
        mkdir "$package" && touch "$package/__init__.py"; \
    done \
    && pip install -c constraints.txt '.[s3,auth,ray]' \
    && pip uninstall -y forecaster \
    && rm -rf forecaster pipelines serving cli build
COPY forecaster/ forecaster/
COPY pipelines/ pipelines/
COPY serving/ serving/
COPY cli/ cli/
# not editable: the image carries no source tree, only the installed packages
RUN pip install --no-deps .


FROM ${BASE_IMAGE}
ARG TORCH_VARIANT=cpu
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="forecaster" \
      org.opencontainers.image.description="Neural time-series forecasters: training, MLflow, BentoML service" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      forecaster.torch-variant="${TORCH_VARIANT}"

# a fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it and volume ownership is
# predictable (deploy/k8s sets runAsUser 10001 and fsGroup 10001)
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --home-dir /home/app --create-home \
        --shell /usr/sbin/nologin app \
    && mkdir -p /home/app/bentoml /app \
    && chown -R 10001:10001 /home/app /app

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/app \
    BENTOML_HOME=/home/app/bentoml \
    MPLBACKEND=Agg

WORKDIR /app
# the race configs: their data_dir (../../shared/data/...) resolves to /shared/data, where
# docker-compose.yml and the Kubernetes CronJob mount the data sets
COPY --chown=10001:10001 configs/ configs/
# the MLflow server's basic-auth settings and the step that creates its users (docker-compose.yml
# and deploy/k8s point MLFLOW_AUTH_CONFIG_PATH here)
COPY --chown=10001:10001 deploy/mlflow-auth/ mlflow-auth/

USER 10001:10001

# 3000: the BentoML service (and its /metrics); 9101: `forecaster schedule`'s /metrics
EXPOSE 3000 9101

# no curl in the slim image: Python asks /readyz. The trainer and the MLflow server run from
# this image too; docker-compose.yml gives them health checks of their own.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]

CMD ["forecaster", "serve", "--host", "0.0.0.0", "--port", "3000"]
