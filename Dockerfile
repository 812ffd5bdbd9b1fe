# One image for the three Braid roles (signal, router, media): the role is chosen with `--role` at run time.
#   docker build -t braid:0.1.0 .
#   docker run --rm -p 7880:7880 braid:0.1.0 --dev --bind 0.0.0.0
# The Helm chart in deploy/helm/braid runs it as `braid-server --config /etc/braid/braid.yaml --role <role> ...`.

ARG PYTHON_IMAGE=python:3.11-slim

# Build: `pip install .` compiles proto/ into braid/rpc (grpcio-tools, a build requirement) and installs Braid with
# its dependencies into a virtual environment that the runtime stage copies as is.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# gcc and libssl-dev compile the forwarding fast path (services/media/fastpath/_fastpath.c); the runtime stage
# needs only libssl3, which the Python image already has.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/braid
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY braid ./braid
COPY services ./services
RUN /opt/braid/bin/pip install --upgrade pip \
    && /opt/braid/bin/pip install . \
    && /opt/braid/bin/braid-server --help >/dev/null \
    && /opt/braid/bin/python -c "import braid.services.media.fastpath._fastpath"

# Runtime: no compilers, no sources, a fixed unprivileged user (the chart's runAsUser 10001).
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="braid" \
      org.opencontainers.image.description="Braid: a clustered, LiveKit-compatible real-time media server" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 braid \
    && useradd --system --uid 10001 --gid braid --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin braid
COPY --from=build /opt/braid /opt/braid
ENV PATH=/opt/braid/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp
USER 10001:10001
# HTTP/WebSocket (signal) and /healthz + /readyz (every role), internal gRPC, media UDP (rtc.port_range_*).
EXPOSE 7880/tcp 7881/tcp 50000-60000/udp
ENTRYPOINT ["braid-server"]
