# syntax=docker/dockerfile:1
#
# The orchestrator image (the gateway itself; compose.yml builds it). It needs no GPU and no CUDA: it
# manages the GPU runtime container (llm_runtime) through the Docker socket that compose.yml mounts.
# The runtime image is a different one: RUNTIME_IMAGE (vLLM/SGLang, or your own from runtime/Dockerfile).
#
#   docker build -t llm-gateway:latest .
#
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first, so a code change does not reinstall them: setup.cfg lists them all.
COPY setup.cfg pyproject.toml README.md ./
RUN mkdir -p gateway && echo '__version__ = "0"' > gateway/__init__.py \
 && pip install . && pip uninstall -y llm-gateway && rm -rf gateway build *.egg-info
COPY . .
# Editable: the dashboard templates, static files and eval-repo/ are read from /app at run time.
RUN pip install --no-deps -e . && mkdir -p /app/var /app/config

# Runs as root on purpose: it drives the Docker Engine through /var/run/docker.sock, which is
# root-equivalent on the host whoever the process is; a non-root user would only need the host's
# docker group id baked in. Keep the API port behind the gateway's own scoped keys.
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LISTEN_PORT', '8000'), timeout=4)"]
CMD ["llm-gateway", "serve"]
