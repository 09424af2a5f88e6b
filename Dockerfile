# syntax=docker/dockerfile:1
#
# pixstream: gunicorn with gevent workers, on PostgreSQL (DATABASE_URL).
#   docker build -t pixstream .
#   docker run --stop-timeout 30 -e DATABASE_URL=postgresql://... -p 8000:8000 pixstream
# Give containers a stop timeout above gunicorn's graceful_timeout (long poll
# + 5 s = 13 s by default): Docker's default of 10 s would kill workers that
# are still draining. compose.yaml sets stop_grace_period for this.

# -- build: wheels for pixstream and every dependency -------------------------
FROM python:3.11-slim-bookworm AS build

WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime: the wheels installed, nothing else ------------------------------
FROM python:3.11-slim-bookworm

# The wheels are bind-mounted from the build stage, so no layer ever holds them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && groupadd --system --gid 10001 pixstream \
    && useradd --system --uid 10001 --gid 10001 --no-log-init \
        --home-dir /var/lib/pixstream --create-home --shell /usr/sbin/nologin pixstream

WORKDIR /app
COPY gunicorn.conf.py ./

# PYTHONUNBUFFERED: log lines reach `docker logs` at once.
# PIXSTREAM_DATA_DIR: writable, should the image ever run without DATABASE_URL
# (the embedded PostgreSQL); with DATABASE_URL set it is unused.
# --worker-tmp-dir: gunicorn's worker heartbeat files on tmpfs, not the overlay.
ENV PYTHONUNBUFFERED=1 \
    PORT=8000 \
    PIXSTREAM_DATA_DIR=/var/lib/pixstream \
    GUNICORN_CMD_ARGS="--worker-tmp-dir /dev/shm"

# Numeric, so that orchestrators can check runAsNonRoot.
USER 10001:10001
EXPOSE 8000

# 200 only when the database answers and the listener is up; slim has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:{}/readyz'.format(os.environ.get('PORT', '8000')), timeout=2)"]

# gunicorn's master drains on SIGTERM: waiting long polls answer 204 at once.
STOPSIGNAL SIGTERM

# The package is installed, not copied: build the app with its factory.
CMD ["gunicorn", "-c", "/app/gunicorn.conf.py", "pixstream:create_app()"]
