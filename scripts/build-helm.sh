#!/usr/bin/env bash
# Builds (or reuses) the pinned helm binary from the Go module proxy and prints its path.
#   ${RLHF_CACHE_DIR:-$HOME/.cache/rlhf-operator}/bin/helm-<version>/helm
# A cold build takes a few minutes on 2 cores; later calls only print the path. Concurrent calls are safe
# (an flock, and the finished directory appears by an atomic rename), as in tests/cluster/build-binaries.sh.
#
# usage: scripts/build-helm.sh            Environment: HELM_VERSION (default below), RLHF_CACHE_DIR, RLHF_GO_BUILD_P.
set -euo pipefail

version="${HELM_VERSION:-v3.22.0}"
cache_root="${RLHF_CACHE_DIR:-$HOME/.cache/rlhf-operator}/bin"
dest="$cache_root/helm-$version"
mkdir -p "$cache_root"

if [[ ! -f "$dest/.complete" ]]; then
  exec {lock_fd}>"$cache_root/.lock-helm-$version"
  flock "$lock_fd"
  if [[ ! -f "$dest/.complete" ]]; then
    command -v go >/dev/null || { echo "build-helm: needs Go (https://go.dev/dl/)" >&2; exit 1; }
    out="$(mktemp -d "$cache_root/.tmp-helm-$version.XXXXXX")"
    echo "build-helm: building helm $version with go install (a few minutes, once)" >&2
    if ! GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-p=${RLHF_GO_BUILD_P:-2} -modcacherw" GOBIN="$out" \
        nice -n 19 go install -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" \
        "helm.sh/helm/v3/cmd/helm@$version"; then
      rm -rf "$out"
      echo "build-helm: FAILED to build helm $version" >&2
      exit 1
    fi
    chmod 755 "$out"
    touch "$out/.complete"
    rm -rf "$dest"
    mv "$out" "$dest"
  fi
  exec {lock_fd}>&-
fi
echo "$dest/helm"
