# syntax=docker/dockerfile:1.7
# Two images from one file, on one base (docs/install.md "Images"):
#   docker build --target operator -t adaptermerge-operator .   (no torch)
#   docker build --target worker   -t adaptermerge-worker .     (torch with its CUDA 13 libraries, peft...)
# One CUDA stack: PyPI's torch wheel brings its CUDA libraries (nvidia-* wheels in requirements/worker.txt)
# and the NVIDIA container toolkit brings the driver (>= 580 for CUDA 13), so the worker needs no
# nvidia/cuda base: both images start FROM the same slim Debian Python.
# Dependencies install from the lock files in a layer before any source is copied, so a code change
# rebuilds only the small project layer. pip's HTTP cache is a build cache mount (kept by the builder
# between builds, never in a layer): where the index sends cache headers, a new lock downloads only
# what changed. Both images run as the unprivileged user 10001.
# BASE_IMAGE: any Debian bookworm image with python3 (>= 3.11, with venv) works; scripts/images/build.sh
# passes one made locally with mmdebstrap, where no registry can be reached.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- shared ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime-base
RUN groupadd --gid 10001 adaptermerge \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin adaptermerge
# The chart mounts the root filesystem read-only: no bytecode caches, logs unbuffered to stdout.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# The project as a wheel, built once for both images (only this stage sees the source).
FROM runtime-base AS project-wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY merge_worker ./merge_worker
COPY operator ./operator
RUN python3 -m venv /opt/build-venv \
    && /opt/build-venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- operator -------------------------------------------------------------------------------------
FROM runtime-base AS operator
# Base dependencies plus the operator extra only: no torch in the operator image.
COPY requirements/operator.txt /opt/requirements.txt
RUN --mount=type=cache,id=adaptermerge-pip,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r /opt/requirements.txt
COPY --from=project-wheel /wheels /opt/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /opt/wheels/adaptermerge-*.whl
USER 10001:10001
ENTRYPOINT ["adaptermerge", "operator"]

# ---- worker ---------------------------------------------------------------------------------------
FROM runtime-base AS worker
# Triton (torch's GPU kernel compiler, used by the merge's fused kernels) builds a small C launcher with
# the system C compiler and the Python headers the first time it runs on a GPU.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
         apt-get install -y --no-install-recommends libpython3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/worker.txt /opt/requirements.txt
RUN --mount=type=cache,id=adaptermerge-pip,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r /opt/requirements.txt
COPY --from=project-wheel /wheels /opt/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /opt/wheels/adaptermerge-*.whl
# The merge's Triton kernels and their C launchers, compiled now for the common GPU architectures (no GPU
# needed; merge_worker/kernel_cache.py), so a pod does not spend seconds compiling them: a run on a GPU
# copies its architecture's into its own cache. Another architecture compiles them at run time as before.
ENV ADAPTERMERGE_BAKED_TRITON_CACHE=/opt/adaptermerge/triton-cache
RUN /opt/venv/bin/python -m merge_worker.kernel_cache bake "$ADAPTERMERGE_BAKED_TRITON_CACHE" \
    && rm -rf /tmp/adaptermerge-libcuda-stub
# Models and adapters come from mounted volumes only: never reach for a model hub at run time. Caches go
# to /tmp (an emptyDir in the chart's pods): the root filesystem is read-only there.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/huggingface TRITON_CACHE_DIR=/tmp/triton
USER 10001:10001
# The operator's Job gives the full command (`adaptermerge run ...`); alone the image is the CLI.
ENTRYPOINT ["adaptermerge"]
CMD ["--help"]
