# syntax=docker/dockerfile:1
# Rebuild the guard bundle (models/) with PyTorch on the CPU: about 20 minutes on 2 cores.
#   docker build -f docker/training.Dockerfile -t backdoor-guard-train .
#   mkdir -p models-new
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/models-new:/out" backdoor-guard-train  # every stage
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD/models-new:/out" backdoor-guard-train all --smoke --out /out
# (--user: the bundle is written as you, into a folder you own; without it, as the image's trainer user.)
# Then point the service at it: GUARD_MODELS_DIR, or copy it over models/ and rebuild the service image.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
FROM ${PYTHON_IMAGE}
# Caches under /tmp: any --user can write there, whatever HOME is.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib XDG_CACHE_HOME=/tmp/cache
# Fashion-MNIST, as the repository's training reads it: Debian's IDX files in /usr/share/datasets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
# torch first, from PyTorch's CPU index and pinned: from the default index, `torch` brings several GB of
# CUDA wheels. The train extra's torch==2.13.0 is then already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md /src/
# training/ imports service/: one guard implementation for calibration, evaluation and serving.
COPY training /src/training
COPY service /src/service
# the serve extra too: training imports service/, whose errors and decoding use FastAPI's and pydantic's types
RUN pip install "/src[train,serve]"
RUN groupadd --system --gid 10001 trainer \
 && useradd --system --uid 10001 --gid trainer --create-home --shell /usr/sbin/nologin trainer \
 && mkdir /out && chown trainer:trainer /out
USER trainer
WORKDIR /home/trainer
VOLUME ["/out"]
ENTRYPOINT ["python", "-m", "training"]
CMD ["all", "--out", "/out"]
