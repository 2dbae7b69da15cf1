#!/usr/bin/env bash
# Builds the libcni driver (conformance/go/cnidriver, a Go module on
# github.com/containernetworking/cni v1.3.1) with Go >= 1.26 from
# /usr/local/go/bin/go (or `go` on PATH when that is new enough), fetching the
# module through the Go module proxy on a cold machine.
# Output: conformance/go/bin/cnidriver (gitignored). Skipped in a moment when
# the binary is newer than main.go, go.mod and go.sum.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/conformance/go/cnidriver"
out="$root/conformance/go/bin"
bin="$out/cnidriver"

up_to_date() {
    [ -x "$bin" ] || return 1
    local f
    for f in "$src"/*.go "$src/go.mod" "$src/go.sum"; do
        [ -e "$f" ] || continue
        [ "$bin" -nt "$f" ] || return 1
    done
}
if up_to_date; then
    echo "build-cnidriver: $bin is up to date"
    exit 0
fi

go=/usr/local/go/bin/go
if [ ! -x "$go" ]; then
    go=$(command -v go || true)
fi
if [ -z "$go" ] || ! GOTOOLCHAIN=local "$go" env GOVERSION | grep -Eq '^go1\.(2[6-9]|[3-9][0-9])'; then
    echo "build-cnidriver: Go >= 1.26 not found at /usr/local/go/bin/go nor on PATH" >&2
    exit 1
fi
mkdir -p "$out"
cd "$src"
# -mod=mod lets go fill in go.sum on a fresh checkout; a local toolchain
# only; a static binary; no go.work of the caller.
GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 GOWORK=off \
    "$go" build -trimpath -o "$bin.tmp" .
mv -f "$bin.tmp" "$bin"
echo "build-cnidriver: built $bin ($("$go" env GOVERSION), $(grep -m1 'containernetworking/cni ' go.mod | xargs))"
