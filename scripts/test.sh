#!/usr/bin/env bash
# Runs every Tabby test in one go: installs what is missing, builds the
# upstream components the tests run (scripts/upstream.sh, cached by version),
# checks formatting and clippy, builds the release binaries and the libcni
# driver, then `cargo test --workspace --release` (unit, property, namespace,
# Kubernetes and conformance tests; the namespace tests need root). Exits
# non-zero if anything fails and ends with a summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=lib.sh
. scripts/lib.sh
need_root

step "setup (Debian packages, toolchain)"
bash scripts/setup.sh
find_cargo

step "upstream components (scripts/upstream.sh: Kubernetes, etcd, containerd, CNI tools and plugins)"
bash scripts/upstream.sh

step "guest kernel (scripts/guest.sh: Debian's kernel for the qemu guest tests)"
bash scripts/guest.sh

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings

step "cargo build --release --workspace"
cargo build --release --workspace

step "static (musl) binaries for the qemu guests and the lab's images"
CC_x86_64_unknown_linux_musl=${CC_x86_64_unknown_linux_musl:-gcc} \
    cargo build --release --target x86_64-unknown-linux-musl \
    -p tabby-cni -p tabby-node -p tabby-ctl -p tabby-lab-pods

step "building the libcni driver (conformance/go/bin/cnidriver)"
bash scripts/build-cnidriver.sh

step "cargo test --workspace --release"
log="$(mktemp -t tabby-test.XXXXXX)"
# Tests that skip themselves (TABBY_ALLOW_SKIP=1 and no root, or a missing
# program) append a `SKIP <test>: <why>` line here: libtest captures the
# output of a test that passes, so the log above never shows them.
export TABBY_SKIP_LOG="$(mktemp -t tabby-skips.XXXXXX)"
trap 'rm -f "$log" "$TABBY_SKIP_LOG"' EXIT
set +e
cargo test --workspace --release --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

step "summary"
test_summary "$log" "$TABBY_SKIP_LOG" "$status"
