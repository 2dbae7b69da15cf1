#!/usr/bin/env bash
# Builds the upstream Go components that Tabby's tests and lab run
# (Kubernetes, etcd, containerd, cnitool, the CNI reference plugins, CoreDNS,
# the upstream e2e suite) from their Go modules, through the small wrapper
# modules in upstream/<component>/, into a cache outside the tree:
#
#   /var/cache/tabby/<component>-<version>/   the binaries, build.log, BUILDINFO
#   /var/cache/tabby/bin/<binary>             symlinks to the current versions
#
# Run `bash scripts/upstream.sh --help` for the usage.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$ROOT/scripts/lib.sh"
# shellcheck source=SCRIPTDIR/../upstream/versions.env
. "$ROOT/upstream/versions.env"

CACHE=${TABBY_UPSTREAM_CACHE:-/var/cache/tabby}
BIN=${TABBY_UPSTREAM_BIN:-$CACHE/bin}
ALL_COMPONENTS=(k8s etcd containerd cni plugins coredns e2e)
DEFAULT_COMPONENTS=(k8s etcd cni plugins containerd)
PROGRESS_EVERY=${TABBY_UPSTREAM_PROGRESS:-30} # seconds between progress lines
START=$SECONDS

usage() {
    cat <<EOF
usage: bash scripts/upstream.sh [COMPONENT...]

Builds upstream components from their Go modules (versions pinned in
upstream/versions.env) into $CACHE/<component>-<version>/ and
points the symlinks in $BIN/ at them. A component already built
(its directory has .complete) is skipped in a second. Components:

  k8s         Kubernetes $KUBERNETES_VERSION: one multi-call binary 'kube' and the links
              kube-apiserver kube-controller-manager kube-scheduler kubelet
              kube-proxy kubectl (it dispatches on its name, else on argv[1])
  etcd        etcd, etcdctl $ETCD_VERSION
  containerd  containerd, ctr, containerd-shim-runc-v2 $CONTAINERD_VERSION (static)
  cni         cnitool $CNI_VERSION
  plugins     CNI reference plugins $CNI_PLUGINS_VERSION: ptp host-local portmap
              bandwidth tuning firewall bridge loopback
  coredns     coredns $COREDNS_VERSION
  e2e         e2e.test (sig-network + common tests) and agnhost, Kubernetes $KUBERNETES_VERSION
  all         every one of them

Without arguments it builds what Tabby's test suite needs:
  ${DEFAULT_COMPONENTS[*]}

A cold build of k8s takes tens of minutes on 2 cores (e2e too); the others
take a few minutes each. Needs Go >= 1.26 (/usr/local/go/bin/go is put on
PATH) and the Go module proxy. Environment:
  TABBY_UPSTREAM_BIN    the symlink directory (default $CACHE/bin);
                        Tabby's tests look for the binaries there too
  TABBY_UPSTREAM_CACHE  the cache root (default /var/cache/tabby)
  TABBY_UPSTREAM_PROGRESS  seconds between progress lines (default 30)
EOF
}

log() { printf '[%5ds] %s\n' $((SECONDS - START)) "$*"; }
die() {
    printf '\nupstream.sh: FAILED: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- Go -------

# go_ok GO: true if that go binary is at least the newest `go` line of the
# wrapper modules (some upstream modules want a recent patch release).
go_ok() {
    local v
    v=$(GOTOOLCHAIN=local "$1" env GOVERSION 2>/dev/null) || return 1
    [ "$(printf '%s\n%s\n' "$GO_NEED" "${v#go}" | sort -V | head -n1)" = "$GO_NEED" ]
}

find_go() {
    GO_NEED=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$ROOT"/upstream/*/go.mod "$ROOT"/upstream/*/go.mod.in 2>/dev/null | sort -V | tail -n1)
    GO_NEED=${GO_NEED:-1.26}
    local have
    have=$(command -v go 2>/dev/null || true)
    if [ -z "$have" ] || ! go_ok "$have"; then
        # The machines' Go lives in /usr/local/go; Debian's golang is too old.
        if [ -x /usr/local/go/bin/go ] && go_ok /usr/local/go/bin/go; then
            export PATH="/usr/local/go/bin:$PATH"
        elif [ -n "$have" ]; then
            die "$have is $(GOTOOLCHAIN=local "$have" env GOVERSION 2>/dev/null || echo unusable); upstream/*/go.mod need Go >= $GO_NEED (install it at /usr/local/go or put it first on PATH)"
        else
            die "go not found on PATH nor at /usr/local/go/bin/go: install Go >= $GO_NEED there"
        fi
    fi
    GO_VERSION=$(GOTOOLCHAIN=local go env GOVERSION)
    # Use this Go, never a downloaded toolchain; let go fill in go.sum
    # entries that are missing; static binaries; no workspace of the caller.
    export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 GOWORK=off
}

# k8s.io/kubernetes vX.Y.Z -> its staging modules' v0.Y.Z.
staging_version() { echo "v0.${KUBERNETES_VERSION#v1.}"; }

K8S_LDFLAGS() {
    local v=$KUBERNETES_VERSION rest major minor
    rest=${v#v}
    major=${rest%%.*}
    rest=${rest#*.}
    minor=${rest%%.*}
    local f="-s -w" p
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    done
    echo "$f"
}

# ------------------------------------------------------- wrapper modules ---

# Regenerates upstream/<dir>/go.mod from go.mod.in when the Kubernetes
# version or the template changed: the replace block comes from
# k8s.io/kubernetes' own go.mod (its `=> ./staging/src/` lines).
sync_k8s_module() {
    local dir=$ROOT/upstream/$1
    local tmpl=$dir/go.mod.in
    [ -f "$tmpl" ] || die "$tmpl is missing"
    local marker
    marker="// Generated by scripts/upstream.sh from go.mod.in (sha256 $(sha256sum "$tmpl" | cut -c1-16)) for k8s.io/kubernetes $KUBERNETES_VERSION. Do not edit."
    if [ -f "$dir/go.mod" ] && [ "$(head -n1 "$dir/go.mod")" = "$marker" ]; then
        return 0
    fi
    log "$1: generating upstream/$1/go.mod for k8s.io/kubernetes $KUBERNETES_VERSION"
    local json gomod sv replaces
    json=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" 2>>"$WORK/build.log") ||
        die "go mod download k8s.io/kubernetes@$KUBERNETES_VERSION failed (is the Go module proxy reachable?)"
    gomod=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [ -f "$gomod" ] || die "no go.mod of k8s.io/kubernetes@$KUBERNETES_VERSION in the module cache"
    sv=$(staging_version)
    replaces=$(sed -n 's|^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/src/k8s\.io/.*$|\t\1 => \1 '"$sv"'|p' "$gomod")
    [ "$(printf '%s\n' "$replaces" | grep -c .)" -ge 20 ] ||
        die "found only $(printf '%s\n' "$replaces" | grep -c .) staging replace lines in $gomod"
    {
        echo "$marker"
        echo
        awk -v r="$replaces" -v v="$KUBERNETES_VERSION" \
            '{ gsub(/@KUBERNETES_VERSION@/, v) } /^@STAGING_REPLACES@$/ { print r; next } { print }' "$tmpl"
    } >"$dir/go.mod.new"
    mv "$dir/go.mod.new" "$dir/go.mod"
    log "$1: go mod tidy (fills in the requirements and go.sum; commit both)"
    tidy "$dir"
}

# go mod tidy in DIR, its output (a line per module downloaded) in the log.
tidy() {
    local t0=$SECONDS
    printf '\n$ (cd %s && go mod tidy)\n' "$1" >>"$WORK/build.log"
    if ! (cd "$1" && go mod tidy) >>"$WORK/build.log" 2>&1; then
        tail -n 20 "$WORK/build.log" >&2
        die "go mod tidy in ${1#"$ROOT"/} failed (the whole log: $FAILED_LOG)"
    fi
    log "$COMPONENT: go mod tidy done ($((SECONDS - t0))s, $(grep -c '^go: downloading' "$WORK/build.log" || true) modules downloaded so far)"
}

# Re-pins a plain wrapper module (upstream/<dir>/go.mod, checked in) when a
# version in versions.env changed: MODULE=VERSION pairs.
sync_module() {
    local dir=$ROOT/upstream/$1
    shift
    [ -f "$dir/go.mod" ] || die "upstream/$(basename "$dir")/go.mod is missing"
    local pair mod want have changed=
    for pair in "$@"; do
        mod=${pair%=*}
        want=${pair##*=}
        have=$(cd "$dir" && go list -m -f '{{.Version}}' "$mod" 2>/dev/null) || have=none
        if [ "$have" != "$want" ]; then
            log "$(basename "$dir"): pinning $mod $have -> $want"
            (cd "$dir" && go get "$mod@$want") >>"$WORK/build.log" 2>&1 || {
                tail -n 20 "$WORK/build.log" >&2
                die "go get $mod@$want failed (the whole log: $FAILED_LOG)"
            }
            changed=1
        fi
    done
    if [ -n "$changed" ] || [ ! -s "$dir/go.sum" ]; then
        log "$(basename "$dir"): go mod tidy (commit go.mod and go.sum)"
        tidy "$dir"
    fi
}

# ------------------------------------------------------------- building ----

# gobuild LABEL MODDIR ARGS...: runs `go ARGS...` (build or test -c) in
# MODDIR with -v, printing every PROGRESS_EVERY seconds how many packages
# have been compiled; on failure shows the log's tail and dies.
gobuild() {
    local label=$1 moddir=$2
    shift 2
    local logf=$WORK/build.log t0=$SECONDS
    printf '\n$ (cd %s && go %s)\n' "$moddir" "$*" >>"$logf"
    (cd "$moddir" && exec go "$1" -v "${@:2}") >>"$logf" 2>&1 &
    local pid=$! last=$SECONDS n0 n
    n0=$(wc -l <"$logf")
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if ((SECONDS - last >= PROGRESS_EVERY)); then
            last=$SECONDS
            n=$(($(wc -l <"$logf") - n0))
            if ((n == 0)); then
                log "$label: starting ($((SECONDS - t0))s in this step)"
            elif ((TOTAL > 0 && n >= TOTAL)); then
                log "$label: $n packages compiled, linking ($((SECONDS - t0))s in this step)"
            else
                log "$label: $n/${TOTAL:-?} packages compiled, now $(tail -n1 "$logf" | cut -c1-80) ($((SECONDS - t0))s in this step)"
            fi
        fi
    done
    if ! wait "$pid"; then
        echo "----- the build log's last lines -----" >&2
        tail -n 40 "$logf" >&2
        die "$label: go $* failed (the whole log: $FAILED_LOG)"
    fi
    log "$label: done in $((SECONDS - t0))s"
}

# count_deps MODDIR ARGS...: sets TOTAL to the number of packages that
# `go list -deps ARGS` names (the progress lines' denominator); on a cold
# machine this is also where the modules get downloaded.
count_deps() {
    local moddir=$1
    shift
    local t0=$SECONDS
    log "$COMPONENT: resolving packages (downloads modules on a cold machine)"
    TOTAL=$(cd "$moddir" && go list -deps "$@" 2>>"$WORK/build.log" | wc -l) || {
        tail -n 20 "$WORK/build.log" >&2
        die "$COMPONENT: go list -deps $* failed (the whole log: $FAILED_LOG)"
    }
    [ "$TOTAL" -gt 0 ] || die "$COMPONENT: go list found no packages"
    log "$COMPONENT: $TOTAL packages to build ($((SECONDS - t0))s)"
}

# check OUTPUT-PATTERN CMD...: a smoke test of a fresh binary.
check() {
    local want=$1 out
    shift
    out=$("$@" 2>&1) || true
    if ! grep -q -- "$want" <<<"$out"; then
        printf '%s\n' "$out" | head -n 20 >&2
        die "$COMPONENT: '$*' did not print '$want'"
    fi
    log "$COMPONENT: ok: $* -> $(grep -m1 -- "$want" <<<"$out" | cut -c1-100)"
}

build_k8s() {
    sync_k8s_module k8s
    local m=$ROOT/upstream/k8s
    count_deps "$m" .
    gobuild k8s "$m" build -trimpath -ldflags "$(K8S_LDFLAGS)" -o "$WORK/kube" .
    local n
    for n in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        ln -s kube "$WORK/$n"
    done
    check "Kubernetes $KUBERNETES_VERSION" "$WORK/kube-apiserver" --version
    check "Kubernetes $KUBERNETES_VERSION" "$WORK/kubelet" --version
    check "Kubernetes $KUBERNETES_VERSION" "$WORK/kube-proxy" --version
    check "Kubernetes $KUBERNETES_VERSION" "$WORK/kube-scheduler" --version
    check "Kubernetes $KUBERNETES_VERSION" "$WORK/kube-controller-manager" --version
    check "Client Version: $KUBERNETES_VERSION" "$WORK/kubectl" version --client
    check "Kubernetes $KUBERNETES_VERSION" "$WORK/kube" kubelet --version
}

build_e2e() {
    sync_k8s_module e2e
    local m=$ROOT/upstream/e2e
    count_deps "$m" -test . k8s.io/kubernetes/test/images/agnhost
    # `go test -c` has no -v of `go build` (its -v is the tests'): compile
    # the test's imports (and so nearly every package) with `go build -v`
    # first, for the progress lines; `go test -c` then only links.
    local imports
    imports=$(cd "$m" && go list -f '{{join .TestImports " "}}' .) || die "e2e: go list of the test's imports failed"
    # shellcheck disable=SC2086 # a list of package paths
    gobuild e2e-packages "$m" build -trimpath $imports
    gobuild e2e.test "$m" test -c -vet=off -trimpath -ldflags "$(K8S_LDFLAGS)" -o "$WORK/e2e.test" .
    gobuild agnhost "$m" build -trimpath -ldflags "$(K8S_LDFLAGS)" -o "$WORK/agnhost" k8s.io/kubernetes/test/images/agnhost
    check "$KUBERNETES_VERSION" "$WORK/e2e.test" --version
    check "ginkgo" "$WORK/e2e.test" --help
    check "netexec" "$WORK/agnhost" --help
}

build_etcd() {
    sync_module etcd "go.etcd.io/etcd/server/v3=$ETCD_VERSION" "go.etcd.io/etcd/etcdctl/v3=$ETCD_VERSION"
    local m=$ROOT/upstream/etcd
    count_deps "$m" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/etcdctl/v3
    gobuild etcd "$m" build -trimpath -ldflags "-s -w" -o "$WORK/etcd" go.etcd.io/etcd/server/v3
    gobuild etcdctl "$m" build -trimpath -ldflags "-s -w" -o "$WORK/etcdctl" go.etcd.io/etcd/etcdctl/v3
    check "etcd Version: ${ETCD_VERSION#v}" "$WORK/etcd" --version
    check "etcdctl version: ${ETCD_VERSION#v}" "$WORK/etcdctl" version
}

build_containerd() {
    local mod=github.com/containerd/containerd/v2
    sync_module containerd "$mod=$CONTAINERD_VERSION"
    local m=$ROOT/upstream/containerd
    # The tags of containerd's `make STATIC=1`; btrfs needs cgo (off here).
    local tags="urfave_cli_no_docs osusergo netgo static_build no_btrfs"
    local ld="-s -w -X $mod/version.Version=$CONTAINERD_VERSION -X $mod/version.Package=$mod"
    count_deps "$m" -tags "$tags" "$mod/cmd/containerd" "$mod/cmd/ctr" "$mod/cmd/containerd-shim-runc-v2"
    gobuild containerd "$m" build -trimpath -tags "$tags" -ldflags "$ld" -o "$WORK/containerd" "$mod/cmd/containerd"
    gobuild ctr "$m" build -trimpath -tags "$tags" -ldflags "$ld" -o "$WORK/ctr" "$mod/cmd/ctr"
    gobuild containerd-shim-runc-v2 "$m" build -trimpath -tags "$tags no_grpc" -ldflags "$ld" \
        -o "$WORK/containerd-shim-runc-v2" "$mod/cmd/containerd-shim-runc-v2"
    check "$CONTAINERD_VERSION" "$WORK/containerd" --version
    check "$CONTAINERD_VERSION" "$WORK/ctr" --version
    check "$CONTAINERD_VERSION" "$WORK/containerd-shim-runc-v2" -v
}

build_cni() {
    sync_module cni "github.com/containernetworking/cni=$CNI_VERSION"
    local m=$ROOT/upstream/cni
    count_deps "$m" github.com/containernetworking/cni/cnitool
    gobuild cnitool "$m" build -trimpath -ldflags "-s -w" -o "$WORK/cnitool" github.com/containernetworking/cni/cnitool
    check "cnitool" "$WORK/cnitool"
}

PLUGINS=(main/ptp ipam/host-local meta/portmap meta/bandwidth meta/tuning meta/firewall main/bridge main/loopback)
build_plugins() {
    local mod=github.com/containernetworking/plugins
    sync_module plugins "$mod=$CNI_PLUGINS_VERSION"
    local m=$ROOT/upstream/plugins p pkgs=()
    for p in "${PLUGINS[@]}"; do pkgs+=("$mod/plugins/$p"); done
    count_deps "$m" "${pkgs[@]}"
    # One `go build -o DIR` builds all of them in parallel, named by package.
    gobuild plugins "$m" build -trimpath \
        -ldflags "-s -w -X $mod/pkg/utils/buildversion.BuildVersion=$CNI_PLUGINS_VERSION" \
        -o "$WORK/" "${pkgs[@]}"
    for p in "${PLUGINS[@]}"; do
        [ -x "$WORK/${p#*/}" ] || die "plugins: $WORK/${p#*/} was not built"
    done
    check "CNI portmap plugin $CNI_PLUGINS_VERSION" env -u CNI_COMMAND "$WORK/portmap"
    check '"supportedVersions"' env CNI_COMMAND=VERSION "$WORK/portmap"
}

build_coredns() {
    local mod=github.com/coredns/coredns
    sync_module coredns "$mod=$COREDNS_VERSION"
    local m=$ROOT/upstream/coredns
    count_deps "$m" -tags grpcnotrace "$mod"
    gobuild coredns "$m" build -trimpath -tags grpcnotrace -ldflags "-s -w" -o "$WORK/coredns" "$mod"
    check "CoreDNS-${COREDNS_VERSION#v}" "$WORK/coredns" -version
}

version_of() {
    case $1 in
    k8s | e2e) echo "$KUBERNETES_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    containerd) echo "$CONTAINERD_VERSION" ;;
    cni) echo "$CNI_VERSION" ;;
    plugins) echo "$CNI_PLUGINS_VERSION" ;;
    coredns) echo "$COREDNS_VERSION" ;;
    esac
}

# Points $BIN/<name> at every binary (or link) in a component's directory,
# each by an atomic rename of a fresh symlink.
link_farm() {
    local dir=$1 f name
    mkdir -p "$BIN"
    for f in "$dir"/*; do
        name=$(basename "$f")
        if [ ! -x "$f" ] || [ -d "$f" ]; then continue; fi
        ln -sfn "$f" "$BIN/.$name.new"
        mv -Tf "$BIN/.$name.new" "$BIN/$name"
    done
}

SUMMARY=()
WORK=
FAILED_LOG=
# On failure or interrupt: keep the build log beside the cache, drop the
# half-built directory.
cleanup() {
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        [ -f "$WORK/build.log" ] && cp "$WORK/build.log" "$FAILED_LOG"
        rm -rf "$WORK"
    fi
}

run_component() {
    COMPONENT=$1
    local version dir t0=$SECONDS
    version=$(version_of "$COMPONENT")
    [ -n "$version" ] || die "no version for $COMPONENT in upstream/versions.env"
    dir=$CACHE/$COMPONENT-$version
    if [ -f "$dir/.complete" ]; then
        link_farm "$dir"
        log "$COMPONENT $version: already built in $dir, skipped"
        SUMMARY+=("$(printf '%-10s %-8s cached      %6s  %s' "$COMPONENT" "$version" "$(du -sh "$dir" | cut -f1)" "$dir")")
        return 0
    fi
    step "$COMPONENT $version: building into $dir"
    FAILED_LOG=$CACHE/$COMPONENT-$version.failed.log
    WORK=$(mktemp -d "$CACHE/.$COMPONENT-$version.tmp.XXXXXX")
    TOTAL=0
    "build_$COMPONENT"
    {
        echo "component=$COMPONENT"
        echo "version=$version"
        echo "go=$GO_VERSION"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "seconds=$((SECONDS - t0))"
    } >"$WORK/BUILDINFO"
    touch "$WORK/.complete"
    chmod 755 "$WORK"
    # The rename is the commit point: a directory with that name is complete.
    [ -e "$dir" ] && rm -rf "$dir" # an incomplete leftover of an older layout
    mv -T "$WORK" "$dir"
    WORK=
    rm -f "$FAILED_LOG"
    link_farm "$dir"
    local s=$((SECONDS - t0))
    log "$COMPONENT $version: built in ${s}s, $(du -sh "$dir" | cut -f1) in $dir"
    SUMMARY+=("$(printf '%-10s %-8s built %5ss %6s  %s' "$COMPONENT" "$version" "$s" "$(du -sh "$dir" | cut -f1)" "$dir")")
}

main() {
    local comps=() c
    for c in "$@"; do
        case $c in
        -h | --help | help)
            usage
            exit 0
            ;;
        all) comps+=("${ALL_COMPONENTS[@]}") ;;
        k8s | etcd | containerd | cni | plugins | coredns | e2e) comps+=("$c") ;;
        *)
            usage >&2
            die "unknown component '$c'"
            ;;
        esac
    done
    [ ${#comps[@]} -gt 0 ] || comps=("${DEFAULT_COMPONENTS[@]}")
    # Each once, in the order given.
    local seen=" " list=()
    for c in "${comps[@]}"; do
        [[ $seen == *" $c "* ]] || { list+=("$c"); seen+="$c "; }
    done

    need_root
    find_go
    mkdir -p "$CACHE" "$BIN"
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        log "another upstream.sh holds $CACHE/.lock; waiting"
        flock 9
    fi
    trap cleanup EXIT
    log "components: ${list[*]} ($GO_VERSION; cache $CACHE; links in $BIN)"
    for c in "${list[@]}"; do
        run_component "$c"
    done
    step "upstream components ($((SECONDS - START))s)"
    printf '%s\n' "${SUMMARY[@]}"
    echo "binaries: $BIN"
}

main "$@"
