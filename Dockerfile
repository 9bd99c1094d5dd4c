# One image for the weir operator (`python -m weir_operator`) and its workers (`weir run`).
#
#   docker build -t weir:dev .
#
# Stage 1 builds wheels for weir, its native hot path (native/: Rust through PyO3 and maturin)
# and every dependency, pinned by constraints.txt, and installs them into a virtualenv. Rust and
# a C linker live in this stage only. confluent-kafka, rocksdict, orjson and pydantic-core ship
# manylinux wheels; a dependency without a wheel for this platform fails the build here instead
# of dragging a toolchain into the image.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
COPY --from=rust:1.87-slim-bookworm /usr/local/cargo /usr/local/cargo
COPY --from=rust:1.87-slim-bookworm /usr/local/rustup /usr/local/rustup
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY runtime ./runtime
COPY operator ./operator
COPY native ./native
RUN PIP_CONSTRAINT=constraints.txt pip wheel --no-deps --wheel-dir /wheels ./native \
 && pip wheel --wheel-dir /wheels -c constraints.txt . \
 && python -m venv /opt/weir \
 && /opt/weir/bin/pip install --no-index --find-links /wheels weir weir-native \
 && /opt/weir/bin/pip uninstall -y pip \
 && rm -rf /wheels

# Stage 2: the slim base, the virtualenv and nothing else (no pip, no compilers, no sources).
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="weir" \
      org.opencontainers.image.description="Stateful, windowed Kafka pipelines on Kubernetes: the weir operator and runtime" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric user, so `runAsNonRoot` can verify it without a passwd lookup.
RUN groupadd --gid 10001 weir \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin weir \
 && mkdir -p /var/lib/weir/state \
 && chown 10001:10001 /var/lib/weir/state
COPY --from=build /opt/weir /opt/weir
# The root filesystem can be read-only: RocksDB state goes to WEIR_STATE_DIR and temporary
# files to /tmp, both volumes in the pod (emptyDir).
ENV PATH=/opt/weir/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WEIR_STATE_DIR=/var/lib/weir/state \
    TMPDIR=/tmp
VOLUME ["/var/lib/weir/state", "/tmp"]
WORKDIR /var/lib/weir
USER 10001:10001
EXPOSE 9249
ENTRYPOINT ["weir"]
CMD ["--help"]
