# gpumesh: one image for both roles. The command picks the role:
#   docker run gpumesh                          -> coordinator (python -m coordinator, port 8001)
#   docker run gpumesh python -m gpu_client     -> compute client
#
# Normal build (pulls python:3.11-slim, pip reaches PyPI):
#   docker build -t gpumesh .
# Offline build (no Docker Hub, no index): a local base and a host-built wheelhouse:
#   scripts/build-base-image.sh && scripts/build-wheelhouse.sh
#   docker build --build-arg BASE_IMAGE=gpumesh-base:bookworm -t gpumesh .
# When ./wheels holds wheels, every pip call runs with --no-index against it.
# Works with the classic builder (docker-compose 1.29) and BuildKit alike.

ARG BASE_IMAGE=python:3.11-slim

# --- source: the build context, plus an always-present wheels/ (COPY cannot take an optional
# path, so it is created here when the context has none).
FROM ${BASE_IMAGE} AS source
COPY . /src
RUN mkdir -p /src/wheels

# --- wheels: every runtime dependency and gpumesh itself as wheels, in two layers so a source
# change does not refetch the dependencies.
FROM ${BASE_IMAGE} AS wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/build
COPY --from=source /src/wheels /wheelhouse
COPY --from=source /src/pyproject.toml /build/pyproject.toml
RUN set -eu; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then offline=--no-index; else offline=; fi; \
    /opt/build/bin/python -c 'import tomllib; \
        print("\n".join(tomllib.load(open("/build/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /build/requirements.txt; \
    /opt/build/bin/pip wheel $offline --find-links /wheelhouse --wheel-dir /wheels \
        -r /build/requirements.txt
COPY --from=source /src /build/src
RUN set -eu; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then offline=--no-index; else offline=; fi; \
    /opt/build/bin/pip wheel $offline --find-links /wheelhouse --no-deps --wheel-dir /dist \
        /build/src

# --- runtime: a venv (Debian's own python is externally managed) installed from the wheels only.
FROM ${BASE_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/gpumesh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    MESH_HOST=0.0.0.0 MESH_PORT=8001 MESH_DATA_DIR=/data
RUN groupadd --system --gid 10001 gpumesh \
    && useradd --system --uid 10001 --gid gpumesh --home-dir /home/gpumesh --create-home \
        --shell /usr/sbin/nologin gpumesh \
    && mkdir -p /data /run/gpumesh-metrics /join /state \
    && chown gpumesh:gpumesh /data /run/gpumesh-metrics /join /state
COPY --from=wheels /wheels /tmp/wheels
RUN python3 -m venv /opt/gpumesh \
    && /opt/gpumesh/bin/pip install --no-index --find-links /tmp/wheels /tmp/wheels/*.whl
COPY --from=wheels /dist /tmp/dist
RUN /opt/gpumesh/bin/pip install --no-index --find-links /tmp/wheels --no-deps /tmp/dist/*.whl \
    && rm -rf /tmp/dist /tmp/wheels \
    && python -c 'import coordinator, gpu_client, gpumesh, shared'

USER gpumesh
WORKDIR /home/gpumesh
EXPOSE 8001
# The coordinator's liveness; client services turn it off in docker-compose.yml (a client serves
# no HTTP: its restart policy and its reconnect loop keep it in the mesh).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MESH_PORT', '8001'), timeout=2)"]
CMD ["python", "-m", "coordinator"]
