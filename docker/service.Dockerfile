# syntax=docker/dockerfile:1
# The guard service: FastAPI on ONNX Runtime (CPU), the `serve` extra only (no torch), the shipped bundle
# baked in and verified. Build from the repository root:
#   docker build -f docker/service.Dockerfile -t backdoor-guard .
# The base is the Python the lock (docker/requirements-serve.txt) was resolved and tested on; to move to
# another, change PYTHON_IMAGE and re-run `make docker-lock`.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# --- build: a virtual environment with the pinned dependencies and the service package ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
# Dependencies before the code, so that a code change does not reinstall them. Wheels only: nothing is
# compiled, so no compiler is needed in either stage.
COPY docker/requirements-serve.txt /tmp/requirements-serve.txt
RUN /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements-serve.txt
COPY pyproject.toml README.md /src/
COPY service /src/service
RUN /opt/venv/bin/pip install --no-deps /src
# The bundle, without the PyTorch checkpoints: they are for retraining (docker/training.Dockerfile).
COPY models /bundle/models
RUN rm -rf /bundle/models/checkpoints

# --- runtime: the interpreter, the venv and the bundle; no pip cache, no build tools, not root -------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="backdoor-guard" \
      org.opencontainers.image.description="Inference guard that flags backdoor triggers in images sent to a classifier" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 guard \
 && useradd --system --uid 10001 --gid guard --no-create-home --shell /usr/sbin/nologin guard
COPY --from=build /opt/venv /opt/venv
COPY --from=build /bundle/models /opt/backdoor-guard/models
# GUARD_ORT_THREADS: ONNX Runtime's intra-op threads. 0 uses every core the host has, which oversubscribes
# a container with a CPU limit: set it to the limit (docker-compose.yml passes it through).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GUARD_MODELS_DIR=/opt/backdoor-guard/models \
    GUARD_HOST=0.0.0.0 \
    GUARD_PORT=8000 \
    GUARD_ORT_THREADS=0
USER guard
# The image does not build unless its bundle verifies (every SHA-256) and runs one guarded batch. The
# service checks the hashes again at every start and refuses a bundle that does not match.
RUN backdoor-guard verify
EXPOSE 8000
# Ready, not merely alive: the models are loaded and a warm-up batch passed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 CMD ["backdoor-guard", "healthcheck"]
CMD ["backdoor-guard", "serve"]
