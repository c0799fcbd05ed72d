#!/usr/bin/env bash
# Builds the cloud-hypervisor binary from an upstream source tarball, cached by content.
#
#   scripts/build-cloud-hypervisor.sh [VENDOR_DIR]
#
# VENDOR_DIR holds cloud-hypervisor-v*.tar.gz and the one git dependency its Cargo.lock pins,
# micro-http-*.tar.gz (default: ../shared/vendor beside the checkout, which is what CI gives).
# Prints the path of the built binary on stdout, and nothing else.
#
# Why from source: no package registry reachable from CI ships Cloud Hypervisor. On a real KVM
# host the README's install of the upstream release binary stays the way; this script exists
# for the nested-KVM tests (`make test-microvm`) and for hosts with no release download.
#
# Cache: $THAW_CH_CACHE/<sha256 of both tarballs and this recipe>/cloud-hypervisor. A second
# run with the same sources finds it and builds nothing. LICENSE files ride along beside it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
VENDOR=${1:-$here/../../shared/vendor}
CACHE=${THAW_CH_CACHE:-/var/cache/thaw-deps/cloud-hypervisor}

log() { printf '[build-cloud-hypervisor] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -d "$VENDOR" ] || die "no vendor directory at $VENDOR: pass the directory holding cloud-hypervisor-v*.tar.gz"
VENDOR=$(cd "$VENDOR" && pwd)
shopt -s nullglob
ch_tars=("$VENDOR"/cloud-hypervisor-v*.tar.gz)
mh_tars=("$VENDOR"/micro-http-*.tar.gz)
[ ${#ch_tars[@]} = 1 ] || die "expected exactly one cloud-hypervisor-v*.tar.gz in $VENDOR, found ${#ch_tars[@]}"
[ ${#mh_tars[@]} = 1 ] || die "expected exactly one micro-http-*.tar.gz in $VENDOR, found ${#mh_tars[@]}"
ch_tar=${ch_tars[0]}
mh_tar=${mh_tars[0]}

# The key covers the sources and the recipe (this file): a change to either rebuilds.
key=$(cat "$ch_tar" "$mh_tar" "$0" | sha256sum | cut -c1-16)
out=$CACHE/$key
if [ -x "$out/cloud-hypervisor" ]; then
  log "cached: $out/cloud-hypervisor"
  echo "$out/cloud-hypervisor"
  exit 0
fi

command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) to build Cloud Hypervisor"
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "unpacking $(basename "$ch_tar") and $(basename "$mh_tar") into $work"
tar -xzf "$ch_tar" -C "$work"
tar -xzf "$mh_tar" -C "$work"
ch_dir=$(find "$work" -maxdepth 1 -type d -name 'cloud-hypervisor-*' | head -n1)
mh_dir=$(find "$work" -maxdepth 1 -type d -name 'micro-http-*' | head -n1)
[ -n "$ch_dir" ] && [ -n "$mh_dir" ] || die "the tarballs did not unpack to cloud-hypervisor-*/ and micro-http-*/"

# Cargo.lock pins micro_http to a git revision; the tarball is that revision (its name says
# which), so point the git source at the unpacked copy instead of the network.
mkdir -p "$ch_dir/.cargo"
cat >>"$ch_dir/.cargo/config.toml" <<EOF

[patch."https://github.com/firecracker-microvm/micro-http"]
micro_http = { path = "$mh_dir" }
EOF

log "cargo build --release --bin cloud-hypervisor (about 2-4 minutes on 2 cores)"
# The default features (kvm, io_uring) are what the release binary ships with. A private target
# dir keeps this build away from the workspace's.
(cd "$ch_dir" && CARGO_TARGET_DIR="$work/target" cargo build --release --bin cloud-hypervisor >&2) \
  || die "cargo build of Cloud Hypervisor failed (output above)"

stage=$work/out
mkdir -p "$stage"
install -m 0755 "$work/target/release/cloud-hypervisor" "$stage/cloud-hypervisor"
for f in "$ch_dir"/LICENSE* "$ch_dir"/LICENSES; do
  [ -e "$f" ] && cp -r "$f" "$stage/" || true
done
[ -e "$mh_dir/LICENSE" ] && cp "$mh_dir/LICENSE" "$stage/LICENSE.micro-http" || true
"$stage/cloud-hypervisor" --version >&2 || die "the built binary does not run"
# Publish atomically: a concurrent or interrupted run never leaves a half-written cache entry.
rm -rf "$out"
mv "$stage" "$out"
log "built: $out/cloud-hypervisor"
echo "$out/cloud-hypervisor"
