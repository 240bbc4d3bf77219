#!/usr/bin/env bash
# Packages the edge agent for machines without Rust or Python:
#   dist/llmchain-edge-agent-VERSION-linux-x86_64.tar.gz   (and .sha256 beside it)
# holding bin/edge-agent, lib/ (exactly the libtorch shared libraries it loads, resolved with
# ldd), systemd/llmchain-edge-agent.service, install.sh, etc/agent.toml + etc/agent.env
# (examples) and SHA256SUMS. The binary's rpath is rewritten to $ORIGIN/../lib, so it starts
# with no environment at all, wherever the tarball is unpacked.
#
#   scripts/release.sh [--profile release|debug] [--out DIR] [--no-build] [--gzip-level N]
#                      [--binary FILE]   (package this edge-agent instead of target/PROFILE's)
#
# `make release` builds every binary in release mode, then packages. The tests package the
# debug binary (`--profile debug --no-build`): the same code path in seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
profile=release
out="$root/dist"
build=1
gzip_level=6
binary=

die() { printf 'release: %s\n' "$*" >&2; exit 1; }
log() { printf '\033[1mrelease:\033[0m %s\n' "$*" >&2; }
value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; printf '%s' "$2"; }

while (($#)); do
  case $1 in
    --profile) profile="$(value "$@")"; shift ;;
    --profile=*) profile="${1#*=}" ;;
    --out) out="$(value "$@")"; shift ;;
    --out=*) out="${1#*=}" ;;
    --no-build) build=0 ;;
    --gzip-level) gzip_level="$(value "$@")"; shift ;;
    --binary) binary="$(value "$@")"; build=0; shift ;;
    -h|--help) sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
case $profile in
  release) target_dir=release ;;
  debug|dev) target_dir=debug ;;
  *) die "--profile is release or debug, not $profile" ;;
esac
[[ $gzip_level =~ ^[1-9]$ ]] || die "--gzip-level is 1-9"
# Paths given relative to where we were called from.
if [[ -n $binary ]]; then binary="$(readlink -f "$binary")"; fi
mkdir -p "$out" && out="$(cd "$out" && pwd)"
for tool in patchelf ldd readelf sha256sum tar; do
  command -v "$tool" >/dev/null || die "$tool is missing (make setup installs patchelf)"
done

cd "$root"
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
[[ -n $version ]] || die "no version in Cargo.toml [workspace.package]"
arch="$(uname -m)"
name="llmchain-edge-agent-$version-linux-$arch"
libtorch_lib="$(readlink -f .llmchain/libtorch/lib)" || die "no .llmchain/libtorch: run make setup"
[[ -f $libtorch_lib/libtorch_cpu.so ]] || die "no libtorch under $libtorch_lib: run make setup"
# libtorch's own dependencies (libgomp, and the CUDA runtime of CUDA wheels) sit beside it in
# the Python environment (torch/lib, nvidia/*/lib): everything under its site-packages.
bundle_root="$(dirname "$(dirname "$libtorch_lib")")"

if ((build)); then
  log "building the binaries ($profile profile)"
  if [[ $profile == release ]]; then
    cargo build --release --locked --workspace --bins
  else
    cargo build --locked --workspace --bins
  fi
fi
binary="${binary:-target/$target_dir/edge-agent}"
[[ -x $binary ]] || die "$binary is missing: build it (or drop --no-build)"

stage="$out/$name"
rm -rf "$stage" "$out/$name.tar.gz" "$out/$name.tar.gz.sha256"
mkdir -p "$stage/bin" "$stage/lib" "$stage/systemd" "$stage/etc"

# The libraries the binary loads, as the dynamic loader resolves them with the build's rpath;
# those outside libtorch's environment come from the system (glibc, libstdc++, libgcc_s).
mapfile -t resolved < <(ldd "$binary")
libs=()
for line in "${resolved[@]}"; do
  if [[ $line == *"not found"* ]]; then die "$binary: $line"; fi
  [[ $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+(/[^[:space:]]+) ]] || continue
  soname="${BASH_REMATCH[1]}" path="$(readlink -f "${BASH_REMATCH[2]}")"
  if [[ $path == "$bundle_root"/* ]]; then
    libs+=("$soname")
    cp "$path" "$stage/lib/$soname"
  fi
done
((${#libs[@]})) || die "$binary loads no libtorch library (was it built against .llmchain/libtorch?)"
chmod 0644 "$stage"/lib/*
log "bundling ${#libs[@]} libraries: ${libs[*]}"

cp "$binary" "$stage/bin/edge-agent"
chmod 0755 "$stage/bin/edge-agent"
# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader, not the shell
patchelf --set-rpath '$ORIGIN/../lib' "$stage/bin/edge-agent"

cp deploy/systemd/llmchain-edge-agent.service "$stage/systemd/"
cp deploy/systemd/install.sh "$stage/install.sh"
chmod 0755 "$stage/install.sh"
cp deploy/systemd/agent.toml deploy/systemd/agent.env "$stage/etc/"

# Self-check: with no environment, every library resolves inside the bundle or the system.
while IFS= read -r line; do
  [[ $line == *"not found"* ]] && die "bundled binary: $line"
  if [[ $line =~ =\>[[:space:]]+(/[^[:space:]]+) ]]; then
    path="$(readlink -f "${BASH_REMATCH[1]}")"
    if [[ $path == "$bundle_root"/* ]]; then die "bundled binary still loads $path"; fi
  fi
done < <(env -i "$(command -v ldd)" "$stage/bin/edge-agent")
env -i "$stage/bin/edge-agent" --version >/dev/null || die "the bundled binary does not start"

(cd "$stage" && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs sha256sum) >"$out/$name.sums.tmp"
mv "$out/$name.sums.tmp" "$stage/SHA256SUMS"

# Reproducible archive: sorted names, fixed owner and time (the last commit's).
mtime="$(git log -1 --format=%ct 2>/dev/null || echo 0)"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$mtime" \
  -C "$out" -cf - "$name" | gzip -n "-$gzip_level" >"$out/$name.tar.gz.tmp"
mv "$out/$name.tar.gz.tmp" "$out/$name.tar.gz"
(cd "$out" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
log "$out/$name.tar.gz ($(du -h "$out/$name.tar.gz" | cut -f1))"
printf '%s\n' "$out/$name.tar.gz"
