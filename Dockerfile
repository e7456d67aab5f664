# syntax=docker/dockerfile:1
# The llmwatch service. Build with `docker build -t llmwatch .` or through
# docker-compose.yml. Settings come from the environment at run time (see
# .env.example); no key or other secret is part of the image.

FROM python:3.11.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY . .
RUN /opt/venv/bin/pip install .


FROM python:3.11.11-slim-bookworm

LABEL org.opencontainers.image.title="llmwatch" \
      org.opencontainers.image.description="Prometheus metrics on the cost, latency and errors of OpenAI calls"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APP_HOST=0.0.0.0 \
    APP_PORT=8000

RUN useradd --system --user-group --uid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin llmwatch
COPY --from=build /opt/venv /opt/venv

# An empty working directory: llmwatch reads a .env file from here, and
# settings belong in the container's environment instead.
WORKDIR /app
USER llmwatch
EXPOSE 8000

# The slim image has no curl, so Python probes /healthz; urlopen raises,
# and the probe fails, on any status other than 2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('APP_PORT', '8000') + '/healthz', timeout=4)"]

CMD ["llmwatch", "serve"]
