# stockade node agent: the stockade runtime plus the pinned BPF toolchain from Debian bookworm
# (clang 14 and libbpf 1.1: the versions the compile and bpf test tiers run with). Runs as
# root with every capability dropped but BPF, NET_ADMIN and PERFMON (see the chart).
# Build from the repository root: docker build -f images/agent.Dockerfile -t stockade-agent .
ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG GO_IMAGE=golang:1.26.8-bookworm

# stockade-cni, the chained CNI plugin the cni-installer container puts on each node: a static
# binary (it runs on the host, outside this image), from the repository's cni/ module.
FROM ${GO_IMAGE} AS cni
WORKDIR /src
COPY cni/go.mod cni/go.sum cni/main.go ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o /out/stockade-cni .

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
# Editable install: the package finds bpf/ (templates and headers) beside its source tree.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -e .

FROM ${DEBIAN_IMAGE}
ARG PYTHON_VERSION=3.11.2-1+b1
# Pinned: a different clang can produce different objects (and the compile cache key includes
# its version); libbpf.so.1 is what stockade.datapath loads through ctypes; libbpf-dev and
# linux-libc-dev give clang <bpf/bpf_helpers.h> and the kernel UAPI headers.
ARG CLANG_VERSION=1:14.0.6-12
ARG CLANG_META_VERSION=1:14.0-55.7~deb12u1
ARG LIBBPF_VERSION=1:1.1.2-0+deb12u1
ARG LINUX_LIBC_DEV_VERSION=6.1.192-2
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3=${PYTHON_VERSION} \
      clang-14=${CLANG_VERSION} clang=${CLANG_META_VERSION} \
      libbpf1=${LIBBPF_VERSION} libbpf-dev=${LIBBPF_VERSION} \
      linux-libc-dev=${LINUX_LIBC_DEV_VERSION} libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/stockade /opt/stockade
COPY --from=cni /out/stockade-cni /opt/stockade/bin/stockade-cni
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["stockade"]
CMD ["agent"]
