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

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings

step "cargo build --release --workspace"
cargo build --release --workspace

step "building the libcni driver (conformance/go/bin/cnidriver)"
bash scripts/build-cnidriver.sh

step "cargo test --workspace --release"
log="$(mktemp -t tabby-test.XXXXXX)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --release --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# Sum cargo's "test result:" lines over every test binary.
read -r passed failed ignored < <(awk '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed;?$/)  p += $i
            if ($(i+1) ~ /^failed;?$/)  f += $i
            if ($(i+1) ~ /^ignored;?$/) g += $i
        }
    }
    END { printf "%d %d %d\n", p, f, g }' "$log")
skipped=$(grep -c '^SKIP ' "$log" || true)

step "summary"
if grep -qE '^test .* \.\.\. FAILED$' "$log"; then
    echo "failed tests:"
    grep -E '^test .* \.\.\. FAILED$' "$log" | sed 's/^test /  /; s/ \.\.\. FAILED$//'
fi
[ "$skipped" -gt 0 ] && echo "$skipped tests skipped themselves (not root?)"
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    echo "cargo test exited with $status (a build error or a crashed test binary)"
    failed=1
fi
echo "$passed passed, $failed failed, $ignored skipped"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
