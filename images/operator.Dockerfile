# stockade operator: Python (Debian bookworm's 3.11) and the stockade runtime; no compiler, no
# kernel access. Runs as uid 65532 on a read-only root filesystem (the chart mounts /tmp).
# Build from the repository root: docker build -f images/operator.Dockerfile -t stockade-operator .
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
ARG PYTHON_VERSION=3.11.2-1+b1
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3=${PYTHON_VERSION} python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/stockade
COPY pyproject.toml README.md ./
# The runtime only (.importlinter, "the runtime never imports the bench"): the sandbox, the
# conformance engines and the datapath test harness stay out, and so does the `bench` extra.
COPY operator/stockade/__init__.py operator/stockade/py.typed operator/stockade/
COPY operator/stockade/cli.py operator/stockade/
COPY operator/stockade/runtime/ operator/stockade/runtime/
COPY operator/stockade/model/ operator/stockade/model/
COPY operator/stockade/compiler/ operator/stockade/compiler/
COPY operator/stockade/handoff/ operator/stockade/handoff/
COPY operator/stockade/datapath/ operator/stockade/datapath/
COPY operator/stockade/control/ operator/stockade/control/
COPY operator/stockade/agent/ operator/stockade/agent/
COPY operator/stockade/inspect/ operator/stockade/inspect/
COPY bpf/ bpf/
COPY crds/ crds/
# Editable install: the package finds bpf/ beside its source tree.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -e .

FROM ${DEBIAN_IMAGE}
ARG PYTHON_VERSION=3.11.2-1+b1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=${PYTHON_VERSION} \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/stockade /opt/stockade
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["stockade"]
CMD ["operator", "--leader-election"]
