# One image for the weir operator (`weir operator`) and the runtime workers (`weir run`).
# confluent-kafka and rocksdict ship manylinux wheels, so no compiler is needed in any stage.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY runtime ./runtime
COPY operator ./operator
RUN python -m venv /opt/weir \
 && /opt/weir/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin weir
COPY --from=build /opt/weir /opt/weir
ENV PATH=/opt/weir/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Workers keep RocksDB state under /var/lib/weir (an emptyDir or PVC in the pod); the root
# filesystem can stay read-only.
WORKDIR /var/lib/weir
USER 10001:10001
ENTRYPOINT ["weir"]
