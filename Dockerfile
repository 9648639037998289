# syntax=docker/dockerfile:1
# The kvpool image: one image runs `kvpool operator`, `kvpool router` and `kvpool sidecar`
# (the chart's operator and the pods the operator creates pick the command).
#
#   docker build -t kvpool:0.1.0 .
#
# Stage "builder" compiles the codec extension (C++ core, nanobind bindings; CUDA kernels
# only where nvcc is present, so none here) and the gRPC stubs with `make kernels proto`,
# then installs kvpool, non-editable, into the virtual environment /opt/kvpool. Stage "runtime" copies that
# environment onto a clean slim base and runs it as an unprivileged user.
# The vLLM worker image (vLLM + the kvpool connector) is Dockerfile.worker.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# The CPU build of torch the codec's Python API runs on; --build-arg TORCH_SPEC= leaves it out.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/kvpool \
 && /opt/kvpool/bin/pip install --upgrade pip setuptools wheel \
 && if [ -n "${TORCH_SPEC}" ]; then \
        /opt/kvpool/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"; \
    fi
WORKDIR /src
COPY Makefile pyproject.toml README.md ./
COPY kernels/ kernels/
COPY kvpool/ kvpool/
# `make kernels proto`, the same steps as on a developer's machine, with /opt/kvpool as the
# environment (its stamp marks it installed: make must not install torch and vLLM into it).
# The extension lands in kvpool/kernels/, the gRPC stubs beside their .proto; both are
# package data of the non-editable install. The build tools leave the environment after.
RUN /opt/kvpool/bin/pip install "cmake>=3.26" ninja "nanobind>=2.0" "grpcio-tools>=1.66" \
 && touch /opt/kvpool/.kvpool-installed \
 && make kernels proto VENV=/opt/kvpool \
 && /opt/kvpool/bin/pip uninstall -y cmake ninja nanobind grpcio-tools \
 && /opt/kvpool/bin/pip install . \
 && rm /opt/kvpool/.kvpool-installed \
 && /opt/kvpool/bin/kvpool --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kvpool" \
      org.opencontainers.image.description="kvpool operator, router and KV transfer sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
# The same numeric user the chart's securityContext runs as (runAsUser 65532).
RUN groupadd --system --gid 65532 kvpool \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kvpool
COPY --from=builder /opt/kvpool /opt/kvpool
# Read-only root filesystem friendly: no bytecode written at run time, caches under /tmp.
ENV PATH=/opt/kvpool/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
USER 65532:65532
WORKDIR /tmp
EXPOSE 8000 8080
ENTRYPOINT ["kvpool"]
CMD ["--help"]
