# syntax=docker/dockerfile:1.7
# The trainer, for CUDA nodes: bin/cloud-trainer under /opt/llmchain with rpath
# $ORIGIN/../lib/torch/lib, and lib/ holding libtorch (torch/lib) and the CUDA libraries of the
# torch wheel (nvidia/*/lib) in the wheel's relative layout, so libtorch's own
# $ORIGIN/../../nvidia/* rpaths resolve. Unlike the agent bundle this keeps every CUDA
# library: cuDNN and cuBLAS load parts of themselves with dlopen, which ldd cannot see.
# The NVIDIA container toolkit provides the driver (libcuda) at run time. Build from the
# repository root:
#   docker build -f deploy/docker/cloud-trainer.Dockerfile -t llmchain/cloud-trainer:0.1.0 .
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler python3 python3-venv patchelf \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/runtime.txt requirements/runtime.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements/runtime.txt
COPY . .
# rustc links with --as-needed, and nothing in our code references libtorch_cuda directly, so
# the binary would silently run on the CPU; --no-as-needed keeps libtorch_cuda (and with it
# the CUDA backend) loaded. The readelf check fails the build otherwise.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && mkdir -p .llmchain && ln -sfn "$site/torch" .llmchain/libtorch \
 && cargo rustc --release --locked -p llmchain-cloud-trainer --bin cloud-trainer -- \
      -C link-arg=-Wl,--no-as-needed -C link-arg=-ltorch_cuda \
 && readelf -d target/release/cloud-trainer | grep -q 'libtorch_cuda.so' \
 && install -D -m 0755 target/release/cloud-trainer /bundle/bin/cloud-trainer \
 && patchelf --set-rpath '$ORIGIN/../lib/torch/lib' /bundle/bin/cloud-trainer \
 && mkdir -p /bundle/lib/torch/lib \
 && cp -a "$site"/torch/lib/*.so* /bundle/lib/torch/lib/ \
 && rm -f /bundle/lib/torch/lib/libtorch_python.so \
 && for dir in "$site"/nvidia/*/lib; do \
      dest="/bundle/lib/nvidia/$(basename "$(dirname "$dir")")/lib"; \
      mkdir -p "$dest" && cp -a "$dir"/*.so* "$dest"/; \
    done

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /bundle/ /opt/llmchain/
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
WORKDIR /work
ENTRYPOINT ["/opt/llmchain/bin/cloud-trainer"]
CMD ["device"]
