# syntax=docker/dockerfile:1.7
# The psft operator image: `psft operator`, with only the operator's dependencies
# (kopf, kubernetes, hera); no torch. Build from the repository root:
#   docker build -t ghcr.io/psft-dev/psft-operator:0.1.0 .
# The Helm chart (charts/psft) runs it non-root with a read-only root filesystem.

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY workflows/ workflows/
COPY trainer/ trainer/
COPY operator/ operator/
RUN python -m venv /opt/psft \
    && /opt/psft/bin/pip install --no-cache-dir -c constraints.txt ".[operator]" \
    && /opt/psft/bin/psft --help > /dev/null

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="psft-operator" \
      org.opencontainers.image.description="Kubernetes operator for PSFTJobs (Proximal Supervised Fine-Tuning)" \
      org.opencontainers.image.source="https://github.com/psft-dev/psft" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 psft \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin psft
COPY --from=build /opt/psft /opt/psft
ENV PATH=/opt/psft/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 8080: Prometheus /metrics, 8081: /healthz (liveness and readiness)
EXPOSE 8080 8081
ENTRYPOINT ["psft"]
CMD ["operator", "--all-namespaces"]
