#!/usr/bin/env bash
# Installs the LLMChain edge agent from an unpacked release tarball (this script's directory):
# the binary and its libtorch libraries under PREFIX (bin/, lib/: the binary finds them through
# its $ORIGIN/../lib rpath), the example settings into CONFIG_DIR (never overwriting the
# operator's), and the systemd unit with PREFIX and CONFIG_DIR filled in.
#
# Idempotent: unchanged files are left alone; a second run reports nothing to do. When the
# binary, a library or the unit changed, systemd reloads and a running agent restarts.
#
#   sudo ./install.sh [--prefix /opt/llmchain] [--config-dir /etc/llmchain]
#                     [--unit-dir /etc/systemd/system] [--no-systemctl] [--dry-run]
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix=/opt/llmchain
config_dir=/etc/llmchain
unit_dir=/etc/systemd/system
unit=llmchain-edge-agent.service
dry_run=0
use_systemctl=1

usage() { sed -n '2,12s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; printf '%s' "$2"; }

while (($#)); do
  case $1 in
    --prefix) prefix="$(value "$@")"; shift ;;
    --prefix=*) prefix="${1#*=}" ;;
    --config-dir) config_dir="$(value "$@")"; shift ;;
    --config-dir=*) config_dir="${1#*=}" ;;
    --unit-dir) unit_dir="$(value "$@")"; shift ;;
    --unit-dir=*) unit_dir="${1#*=}" ;;
    --no-systemctl) use_systemctl=0 ;;
    --dry-run|-n) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
for dir in "$prefix" "$config_dir" "$unit_dir"; do
  [[ $dir == /* ]] || die "$dir is not an absolute path"
done
prefix="${prefix%/}" config_dir="${config_dir%/}" unit_dir="${unit_dir%/}"

[[ -x "$src/bin/edge-agent" && -d "$src/lib" && -f "$src/systemd/$unit" ]] ||
  die "run me from an unpacked llmchain-edge-agent release (bin/, lib/, systemd/ next to me)"
# A damaged download fails here rather than half-installed.
if [[ -f "$src/SHA256SUMS" ]]; then
  (cd "$src" && sha256sum --quiet --strict -c SHA256SUMS) || die "SHA256SUMS does not match the files"
fi

changed=0      # files written (or, with --dry-run, that would be)
restart=0      # whether a running agent must restart to pick them up

say() { printf '%s\n' "$*"; }

# put MODE SRC DEST: installs SRC at DEST unless DEST already has the same bytes and mode.
put() {
  local mode=$1 from=$2 to=$3
  if [[ -f $to ]] && cmp -s "$from" "$to" && [[ $(stat -c %a "$to") == "${mode#0}" ]]; then
    return 1
  fi
  changed=$((changed + 1))
  if ((dry_run)); then say "would install $to"; return 0; fi
  install -D -m "$mode" "$from" "$to.tmp.$$"
  mv -f "$to.tmp.$$" "$to"   # atomic: a running agent keeps the file it mapped
  say "installed $to"
}

# put_once MODE SRC DEST: an example the operator edits; only when DEST does not exist.
put_once() {
  local mode=$1 from=$2 to=$3
  if [[ -e $to ]]; then return 0; fi
  changed=$((changed + 1))
  if ((dry_run)); then say "would install $to (example)"; return 0; fi
  install -D -m "$mode" "$from" "$to"
  say "installed $to (example: edit it)"
}

put 0755 "$src/bin/edge-agent" "$prefix/bin/edge-agent" && restart=1
for lib in "$src"/lib/*; do
  put 0644 "$lib" "$prefix/lib/$(basename "$lib")" && restart=1
done

# The unit names /opt/llmchain and /etc/llmchain; point it at where things were installed.
rendered="$(mktemp)"
trap 'rm -f "$rendered"' EXIT
sed -e "s#/opt/llmchain/#$prefix/#g" -e "s#/etc/llmchain/#$config_dir/#g" \
  "$src/systemd/$unit" >"$rendered"
put 0644 "$rendered" "$unit_dir/$unit" && restart=1

put_once 0644 "$src/etc/agent.toml" "$config_dir/agent.toml"
put_once 0600 "$src/etc/agent.env" "$config_dir/agent.env"
if [[ ! -d $config_dir/trainer-keys ]]; then
  changed=$((changed + 1))
  if ((dry_run)); then say "would create $config_dir/trainer-keys/"; else
    install -d -m 0755 "$config_dir/trainer-keys"
    say "created $config_dir/trainer-keys/ (put the trainer public keys here)"
  fi
fi

if ((changed == 0)); then
  say "llmchain-edge-agent is up to date in $prefix"
  exit 0
fi
if ((use_systemctl && restart)) && [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  if ((dry_run)); then
    say "would run: systemctl daemon-reload; systemctl try-restart $unit"
  else
    systemctl daemon-reload
    systemctl try-restart "$unit"
  fi
fi
((dry_run)) && exit 0
cat <<NEXT
next:
  1. edit $config_dir/agent.toml (coordinator, sources, executors, labels)
  2. copy the trainer public key(s) to $config_dir/trainer-keys/
  3. systemctl enable --now $unit && journalctl -u $unit -f
NEXT
