#!/usr/bin/env bash
# Build the libcni driver (conformance/go/cnidriver) offline in GOPATH mode
# against Debian's golang-github-appc-cni-dev, as RECIPES.md describes.
# Output: conformance/go/bin/cnidriver (gitignored). Needs scripts/setup.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
go_dir="$root/conformance/go"
out="$go_dir/bin"
mkdir -p "$out/gopath" "$out/gocache"
if [ ! -x /usr/lib/go-1.19/bin/go ] || [ ! -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ]; then
    echo "build-cnidriver: Go 1.19 or Debian's libcni missing (run scripts/setup.sh)" >&2
    exit 1
fi
cd "$go_dir/cnidriver"
GO111MODULE=off GOPATH="$out/gopath:/usr/share/gocode" GOCACHE="$out/gocache" \
    GOFLAGS= CGO_ENABLED=0 PATH="/usr/lib/go-1.19/bin:$PATH" \
    go build -o "$out/cnidriver.tmp" .
mv -f "$out/cnidriver.tmp" "$out/cnidriver"
