# syntax=docker/dockerfile:1.7
# The edge agent: the same bundle as the release tarball (scripts/release.sh): bin/edge-agent
# with rpath $ORIGIN/../lib and lib/ holding exactly the libtorch libraries it loads, under
# /opt/llmchain. Build from the repository root:
#   docker build -f deploy/docker/edge-agent.Dockerfile -t llmchain/edge-agent:0.1.0 .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler python3 python3-venv patchelf \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# libtorch from PyPI's torch wheel, as `make setup` does (its own layer: the slow one).
COPY requirements/runtime.txt requirements/runtime.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements/runtime.txt
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    mkdir -p .llmchain \
 && ln -sfn "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch" .llmchain/libtorch \
 && cargo build --release --locked -p llmchain-edge-agent --bin edge-agent \
 && bash scripts/release.sh --profile release --no-build --gzip-level 1 --out /dist \
 && mkdir -p /bundle \
 && cp -a /dist/llmchain-edge-agent-*/bin /dist/llmchain-edge-agent-*/lib /bundle/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /bundle/ /opt/llmchain/
USER 65532:65532
ENTRYPOINT ["/opt/llmchain/bin/edge-agent"]
CMD ["run", "--config", "/etc/llmchain/agent.toml"]
