# syntax=docker/dockerfile:1.7
# The coordinator: a static-ish Rust binary without libtorch on a distroless base (glibc,
# libgcc, CA certificates; no shell). Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t llmchain/coordinator:0.1.0 .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Only the coordinator's crates are compiled (tch/libtorch is not among them); the check
# fails the build if libtorch ever creeps in.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p llmchain-coordinator --bin coordinator \
 && install -D -m 0755 target/release/coordinator /out/bin/coordinator \
 && if ldd /out/bin/coordinator | grep -E 'torch|c10'; then echo "coordinator links libtorch" >&2; exit 1; fi

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/coordinator /usr/local/bin/coordinator
# The Deployment mounts /etc/llmchain/coordinator.toml, the Secrets and the data volume.
USER 65532:65532
WORKDIR /var/lib/llmchain
EXPOSE 7400 8080
ENTRYPOINT ["/usr/local/bin/coordinator"]
CMD ["serve", "--config", "/etc/llmchain/coordinator.toml"]
