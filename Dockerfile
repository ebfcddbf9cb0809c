# TaskService for Cloud Run (end-to-end HTTP/2, h2c on $PORT), and for a local run.
# Build:  docker build -t taskservice .      (or: podman build / buildah bud)
# Where python:3.11-slim cannot be pulled, point BASE_IMAGE at a copy of it:
#         docker build --build-arg BASE_IMAGE=registry.example/python:3.11-slim -t taskservice .
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/taskservice
COPY pyproject.toml README.md ./
COPY generated/ generated/
COPY taskservice/ taskservice/
# Installs the server, its runtime dependencies and the gcp telemetry extra
# (deploy.sh sets TASKSERVICE_TELEMETRY=gcp) only (no dev tools), then
# byte-compiles everything so a cold start does not compile at import time.
RUN /opt/taskservice/bin/pip install --no-cache-dir ".[gcp]" \
 && /opt/taskservice/bin/python -m compileall -q /opt/taskservice/lib

FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin taskservice \
 && mkdir -p /var/lib/taskservice \
 && chown 10001:10001 /var/lib/taskservice
COPY --from=build /opt/taskservice /opt/taskservice
# The store follows the environment: Firestore on Cloud Run (K_SERVICE is
# set there) or with GOOGLE_CLOUD_PROJECT / FIRESTORE_EMULATOR_HOST, and
# otherwise SQLite in the data directory, which its user can write.
ENV PATH=/opt/taskservice/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080 \
    TASKSERVICE_SQLITE_PATH=/var/lib/taskservice/tasks.db
VOLUME /var/lib/taskservice
WORKDIR /var/lib/taskservice
USER 10001
EXPOSE 8080
# Exec form: the server is PID 1 and receives SIGTERM itself.
CMD ["python", "-m", "taskservice"]
