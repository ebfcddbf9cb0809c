# TaskService for Cloud Run (end-to-end HTTP/2, h2c on $PORT).
# Build:  docker build -t taskservice .      (or: buildah bud -t taskservice .)

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/taskservice
COPY pyproject.toml README.md ./
COPY generated/ generated/
COPY taskservice/ taskservice/
# Installs the server and its runtime dependencies only (no dev tools), then
# byte-compiles everything so a cold start does not compile at import time.
RUN /opt/taskservice/bin/pip install --no-cache-dir . \
 && /opt/taskservice/bin/python -m compileall -q /opt/taskservice/lib

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin taskservice
COPY --from=build /opt/taskservice /opt/taskservice
ENV PATH=/opt/taskservice/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080 \
    TASKSERVICE_STORE=firestore
USER 10001
EXPOSE 8080
# Exec form: the server is PID 1 and receives SIGTERM itself.
CMD ["python", "-m", "taskservice"]
