#!/usr/bin/env bash
# Builds a real kube-apiserver, kubectl and etcd from Go modules into
# .cache/kube/<version>/bin/, for the tests that talk to the Kubernetes API.
#
# Invariants:
#  - the default version is pinned below (DEFAULT_KUBE_VERSION); another release
#    is named on the command line. The output folder is named after the version,
#    so two releases never mix binaries;
#  - the staging modules are pinned at v0.<minor>.<patch> of that release and
#    etcd at the version its k8s.io/kubernetes go.mod requires, so one argument
#    fixes the whole set;
#  - idempotent per binary: one that is present and runs is not built again;
#  - only the Go module proxy is used (no prebuilt binaries are downloaded).
#
# Why a wrapper module: k8s.io/kubernetes's go.mod replaces its staging modules
# (k8s.io/api, k8s.io/apiserver, k8s.io/kubectl, ...) with ./staging paths that
# are not in the module zip. A main module's replace lines win over a
# dependency's, so a small wrapper that requires k8s.io/kubernetes and points
# every staging module at its published v0.X.Y tag builds the very same code.
#
# Usage: scripts/build-kube.sh [v1.X.Y]   (prints the bin folder on its last line)
#        KF_KUBE_JOBS=1 scripts/build-kube.sh   (fewer parallel compile jobs)
set -euo pipefail

# v1.36: the Kubernetes release apiserver-network-proxy v0.36.0 goes with (its go.mod
# requires the k8s.io v0.36 libraries).
DEFAULT_KUBE_VERSION=v1.36.3
KUBE_VERSION=${1:-$DEFAULT_KUBE_VERSION}
if [[ ! "$KUBE_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]]; then
    printf '[build-kube] error: version must look like v1.37.2, got %q\n' "$KUBE_VERSION" >&2
    exit 2
fi
# Staging modules are tagged v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
KUBE_MINOR=${BASH_REMATCH[1]}
STAGING_VERSION="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/.cache/kube/$KUBE_VERSION"
BIN="$OUT/bin"
# Two cores shared with other work: two compile jobs at low priority.
JOBS=${KF_KUBE_JOBS:-2}

log() { printf '[build-kube] %s\n' "$*" >&2; }

runs() { [[ -x "$BIN/$1" ]] && "$BIN/$1" "${@:2}" >/dev/null 2>&1; }

if runs kube-apiserver --version && runs kubectl version --client && runs etcd --version; then
    log "already built: $BIN"
    echo "$BIN"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    log "error: 'go' was not found on PATH; install Go (1.22 or newer; the newer"
    log "toolchain that kubernetes needs is then fetched via GOTOOLCHAIN=auto)"
    exit 2
fi

export GOTOOLCHAIN=auto
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
mkdir -p "$BIN" "$OUT/kube-mod" "$OUT/etcd-mod"
start=$(date +%s)

# --- the wrapper module for k8s.io/kubernetes --------------------------------
log "kubernetes $KUBE_VERSION: fetching k8s.io/kubernetes go.mod"
cd "$OUT/kube-mod"
# The module's go.mod names every staging module it replaces; reuse that list so
# a version bump needs no hand edit here.
kmod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
if [[ -z "$kmod" || ! -f "$kmod" ]]; then
    log "error: could not download k8s.io/kubernetes@$KUBE_VERSION"
    exit 1
fi
staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/.*#\1#p' "$kmod")
ETCD_VERSION=$(sed -n 's#^[[:space:]]*go.etcd.io/etcd/server/v3 \(v[^ ]*\).*#\1#p' "$kmod" | head -1)
if [[ -z "$ETCD_VERSION" ]]; then
    log "error: k8s.io/kubernetes@$KUBE_VERSION's go.mod names no go.etcd.io/etcd/server/v3"
    exit 1
fi
{
    echo "module kf.local/kubebuild"
    echo
    echo "go $(sed -n 's/^go //p' "$kmod")"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $STAGING_VERSION"; done
    echo ")"
} >go.mod
# Blank imports let `go mod tidy` see the whole package graph of both commands.
cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
log "resolving modules ($(echo "$staging" | wc -w) staging modules pinned at $STAGING_VERSION)"
go mod tidy -e >/dev/null 2>"$OUT/tidy-kube.log" || { cat "$OUT/tidy-kube.log" >&2; exit 1; }

# The version both commands report (kubectl's client version, the apiserver's /version).
LDFLAGS="-s -w \
    -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 \
    -X k8s.io/component-base/version.gitMinor=$KUBE_MINOR \
    -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION \
    -X k8s.io/client-go/pkg/version.gitMajor=1 \
    -X k8s.io/client-go/pkg/version.gitMinor=$KUBE_MINOR"

build_cmd() { # name, package
    if runs "$1" --help; then
        log "$1: already built"
        return
    fi
    local t0
    t0=$(date +%s)
    log "$1: compiling (-p $JOBS; takes several minutes)"
    nice -n 10 go build -p "$JOBS" -trimpath -ldflags "$LDFLAGS" -o "$BIN/$1.tmp" "$2"
    mv "$BIN/$1.tmp" "$BIN/$1"
    log "$1: done after $(($(date +%s) - t0)) s"
}
build_cmd kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build_cmd kubectl k8s.io/kubernetes/cmd/kubectl

# --- etcd ----------------------------------------------------------------------
if runs etcd --version; then
    log "etcd: already built"
else
    log "etcd $ETCD_VERSION: resolving modules"
    cd "$OUT/etcd-mod"
    cat >go.mod <<GO
module kf.local/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GO
    # etcd's own entry point, unchanged: the etcd command is a thin main around it.
    cat >main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    go mod tidy >/dev/null 2>"$OUT/tidy-etcd.log" || { cat "$OUT/tidy-etcd.log" >&2; exit 1; }
    log "etcd: compiling"
    nice -n 10 go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" .
    mv "$BIN/etcd.tmp" "$BIN/etcd"
fi

"$BIN/kube-apiserver" --version >&2
"$BIN/kubectl" version --client >&2
"$BIN/etcd" --version >&2
log "built in $(($(date +%s) - start)) s; $(du -sh "$BIN" | cut -f1) in $BIN"
echo "$BIN"
