#!/usr/bin/env bash
# make test-microvm: thaw's real Cloud Hypervisor tests on real KVM (nested/ explains how).
#
# The Cloud Hypervisor binary: $THAW_CLOUD_HYPERVISOR, else `cloud-hypervisor` on PATH (a KVM
# host's install of the release binary), else built from source by build-cloud-hypervisor.sh
# from $CLOUD_HYPERVISOR_VENDOR (default ../shared/vendor, what CI gives).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test-microvm] %s\n' "$*" >&2; }

ch=${THAW_CLOUD_HYPERVISOR:-}
if [ -z "$ch" ]; then
  ch=$(command -v cloud-hypervisor || true)
fi
if [ -z "$ch" ]; then
  vendor=${CLOUD_HYPERVISOR_VENDOR:-../shared/vendor}
  if [ ! -d "$vendor" ]; then
    log "error: no Cloud Hypervisor: none on PATH, THAW_CLOUD_HYPERVISOR unset, and no source at $vendor"
    log "fix: install the release binary (README: Running on a KVM host), or set CLOUD_HYPERVISOR_VENDOR to a directory with cloud-hypervisor-v*.tar.gz and micro-http-*.tar.gz"
    exit 1
  fi
  ch=$(bash scripts/build-cloud-hypervisor.sh "$vendor")
fi
log "Cloud Hypervisor: $ch ($("$ch" --version 2>/dev/null | head -n1))"

cargo build --locked -p thaw-nested
exec env THAW_CLOUD_HYPERVISOR="$ch" \
  THAW_GUEST_INIT="${THAW_GUEST_INIT:-$PWD/target/static/x86_64-unknown-linux-gnu/release/guest-init}" \
  target/debug/thaw-nested "$@"
