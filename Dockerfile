# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t adaptermerge-operator .   (slim Python, no torch)
#   docker build --target worker   -t adaptermerge-worker .     (CUDA runtime, torch, peft, bitsandbytes)
# Python packages come at the versions pinned in pyproject.toml: each image installs the project with
# only the extras it needs. Both run as the unprivileged user 10001 (the Helm chart's runAsUser).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- operator -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY merge_worker ./merge_worker
COPY operator ./operator
# Base dependencies plus the operator extra only: no torch in the operator image.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[operator]"

FROM ${PYTHON_IMAGE} AS operator
RUN groupadd --gid 10001 adaptermerge \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin adaptermerge
COPY --from=operator-build /opt/venv /opt/venv
# The chart mounts the root filesystem read-only: no bytecode caches, logs unbuffered to stdout.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
ENTRYPOINT ["adaptermerge", "operator"]

# ---- worker ---------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker-base
# Ubuntu 24.04's Python 3.12; the torch wheels bring their own CUDA libraries, the base the driver glue.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/*

FROM worker-base AS worker-build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY merge_worker ./merge_worker
COPY operator ./operator
RUN python3.12 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[worker]"

FROM worker-base AS worker
RUN groupadd --gid 10001 adaptermerge \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin adaptermerge
COPY --from=worker-build /opt/venv /opt/venv
# Models and adapters come from mounted volumes only: never reach for a model hub at run time.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/huggingface
USER 10001:10001
# The operator's Job gives the full command (`adaptermerge run ...`); alone the image is the CLI.
ENTRYPOINT ["adaptermerge"]
CMD ["--help"]
