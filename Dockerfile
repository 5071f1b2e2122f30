# syntax=docker/dockerfile:1
# ssf-serve image. CPU by default; the CUDA build of torch with:  docker build --build-arg VARIANT=cuda .
# Weights and the task store are mounted, never baked in: /models (read-only) and /var/lib/ssf (a local
# store directory, when --store is not a redis:// URL). Runs as an unprivileged user.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# 1) torch alone: the largest layer, rebuilt only when VARIANT or the version changes
RUN case "$VARIANT" in \
      cpu) index="$CPU_INDEX" ;; \
      cuda) index="$CUDA_INDEX" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac && \
    pip install --index-url "$index" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# 2) the other dependencies, from pyproject.toml only (source edits do not invalidate this layer)
WORKDIR /src
COPY pyproject.toml README.md ./
# onnxruntime and onnxruntime-gpu both install the module `onnxruntime` and must never share an
# environment: the CUDA variant takes the `gpu` extra plus onnx/onnxscript instead of the `onnx` extra.
RUN mkdir ssf service training && \
    if [ "$VARIANT" = cuda ]; then \
      pip install ".[serve,gpu]" "onnx>=1.16" "onnxscript>=0.1" && \
      if pip show onnxruntime >/dev/null 2>&1; then \
        echo "onnxruntime (CPU) was pulled in next to onnxruntime-gpu" >&2; exit 3; fi; \
    else \
      pip install ".[serve,onnx]"; \
    fi && \
    pip uninstall -y ssf-server
# 3) the project itself
COPY ssf ./ssf
COPY service ./service
COPY training ./training
RUN pip install --no-deps . && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="ssf-serve" org.opencontainers.image.description="SSF task server (${VARIANT})"
RUN groupadd --system --gid 10001 ssf && \
    useradd --system --uid 10001 --gid ssf --home-dir /home/ssf --create-home --shell /usr/sbin/nologin ssf && \
    mkdir -p /models /var/lib/ssf && chown ssf:ssf /var/lib/ssf
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/ssf/.cache/huggingface \
    SSF_HOST=0.0.0.0 \
    SSF_PORT=8000 \
    SSF_STORE=/var/lib/ssf/store
USER ssf
WORKDIR /home/ssf
VOLUME ["/var/lib/ssf"]
EXPOSE 8000
# Listening on 0.0.0.0 needs SSF_ADMIN_TOKEN (from an env file or a Secret); without it the server refuses
# to start rather than open the admin plane. Liveness only: readiness (/readyz) is the balancer's business.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SSF_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ssf-serve"]
CMD ["--model", "vit_base_patch16_224", "--weights", "/models/backbone.safetensors"]
