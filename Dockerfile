# syntax=docker/dockerfile:1
# The one image every pipeline step runs in (pipeline.image in the config = base_image of every component).
#
# CUDA: the PyTorch wheels bundle the CUDA runtime, cuDNN and NCCL, so the base only has to provide what the
# NVIDIA container runtime expects (the `base` flavour of nvidia/cuda, ~100 MB, instead of cudnn-runtime's
# ~1.5 GB of libraries torch would not use). Pinned by version; pin the digest too in your registry mirror.
# OpenSlide comes from the openslide-bin wheel (no apt package). No secret is ever baked in: credentials
# reach the pods as environment variables from Kubernetes Secrets (pipelines/platform.py).
#
#   docker build -t ghcr.io/icmil-kfp/icmil:0.1.0 .
#   docker run --rm --gpus all -v "$PWD/runs:/home/icmil/work/runs" ghcr.io/icmil-kfp/icmil:0.1.0 run /opt/icmil/configs/demo.yaml
FROM nvidia/cuda:12.8.1-base-ubuntu24.04

# Same pins as scripts/bootstrap.sh: torch first, so pip never picks a build on its own.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ICMIL_PROGRESS=0

# python3 + venv (Ubuntu 24.04: Python 3.12); libglib2.0-0 and libgomp1 for OpenCV / PyTorch CPU ops.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates libglib2.0-0 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The project, installed from the copied tree (not from an index): the library (icmil) and the Kubeflow layer,
# whose folders components/ and pipelines/ install as icmil_kfp.components and icmil_kfp.pipelines.
WORKDIR /opt/icmil
COPY pyproject.toml README.md LICENSE ./
COPY icmil ./icmil
COPY components ./components
COPY pipelines ./pipelines
COPY configs ./configs
RUN pip install . \
    && python -c "import openslide, torch, icmil, icmil_kfp.components, icmil_kfp.pipelines; print('openslide', openslide.__library_version__, 'torch', torch.__version__)"

# Non-root: pipeline pods run as this user; its home holds run folders, caches and the tracking spool.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin icmil
USER 10001:10001
WORKDIR /home/icmil/work
ENV HOME=/home/icmil

# KFP sets the container command itself (python3 -m kfp.dsl.executor_main ...); `docker run IMAGE <args>`
# runs the CLI, e.g. `docker run IMAGE run /opt/icmil/configs/demo.yaml`.
ENTRYPOINT ["icmil"]
CMD ["--help"]
