#!/usr/bin/env bash
# Builds (or reuses) the binaries of the test cluster from the Go module proxy:
#   kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (wrapper module go/kubernetes)
#   etcd:       etcd (wrapper module go/etcd)
#   minio:      minio (`go install github.com/minio/minio@MINIO_VERSION`)
# Each lands in ${RLHF_CACHE_DIR:-$HOME/.cache/rlhf-operator}/bin/<name>-<version>/ and is reused when present.
# Concurrent calls are safe: each component is built under an flock and published by an atomic rename.
#
# usage: tests/cluster/build-binaries.sh [kubernetes|etcd|minio ...]   (no argument: all three)
# Prints one line per component: "<name> <directory>".
# Environment: RLHF_CACHE_DIR (cache root), RLHF_GO_BUILD_P (parallel compile jobs, default 2).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${RLHF_CACHE_DIR:-$HOME/.cache/rlhf-operator}/bin"
jobs="${RLHF_GO_BUILD_P:-2}"
mkdir -p "$cache_root"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-p=$jobs -mod=readonly -modcacherw"

log() { echo "build-binaries: $*" >&2; }

# build_component NAME VERSION BINARY... -- COMMAND...
# Runs COMMAND with $out set to a fresh temporary directory, checks that each BINARY was produced there, then
# publishes it as $cache_root/NAME-VERSION. Does nothing when that directory is already complete.
build_component() {
  local name="$1" version="$2"; shift 2
  local binaries=()
  while [[ "$1" != "--" ]]; do binaries+=("$1"); shift; done
  shift
  local dest="$cache_root/$name-$version"
  if [[ ! -f "$dest/.complete" ]]; then
    exec {lock_fd}>"$cache_root/.lock-$name-$version"
    flock "$lock_fd"
    if [[ ! -f "$dest/.complete" ]]; then
      local start=$SECONDS
      out="$(mktemp -d "$cache_root/.tmp-$name-$version.XXXXXX")"
      log "building $name $version (a cold build takes a while; see tests/cluster/README.md)"
      if ! "$@"; then
        rm -rf "$out"
        log "FAILED to build $name $version"
        exit 1
      fi
      local b
      for b in "${binaries[@]}"; do
        [[ -x "$out/$b" ]] || { rm -rf "$out"; log "FAILED: $name build produced no $b"; exit 1; }
      done
      chmod 755 "$out"
      touch "$out/.complete"
      rm -rf "$dest"
      mv "$out" "$dest"
      log "built $name $version in $((SECONDS - start)) s"
    fi
    exec {lock_fd}>&-
  fi
  echo "$name $dest"
}

build_kubernetes() {
  local v="$KUBERNETES_VERSION" minor
  minor="${v#v*.}"; minor="${minor%%.*}"
  local ldflags="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitCommit=$KUBERNETES_GIT_COMMIT -X $pkg.gitTreeState=clean"
    ldflags+=" -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  (cd "$here/go/kubernetes" && nice -n 19 go build -trimpath -ldflags "$ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
}

build_etcd() {
  (cd "$here/go/etcd" && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
}

build_minio() {
  # go install puts the binary in $GOBIN; the module's own go.mod has no replace directives, so this works as is.
  # MinIO's release builds stamp the version through ldflags; here it comes from the pseudo-version
  # v0.0.0-YYYYMMDDhhmmss-<commit>, so `minio --version` names the commit and its date.
  local stamp="${MINIO_VERSION#v0.0.0-}" commit
  commit="${stamp#*-}"; stamp="${stamp%%-*}"
  local when="${stamp:0:4}-${stamp:4:2}-${stamp:6:2}T${stamp:8:2}:${stamp:10:2}:${stamp:12:2}Z"
  local pkg=github.com/minio/minio/cmd
  GOBIN="$out" GOFLAGS="-p=$jobs -modcacherw" nice -n 19 go install -trimpath \
    -ldflags "-s -w -X $pkg.Version=$when -X $pkg.ReleaseTag=DEVELOPMENT.${when//:/-} -X $pkg.CommitID=$commit -X $pkg.ShortCommitID=$commit -X $pkg.CopyrightYear=${stamp:0:4}" \
    "github.com/minio/minio@$MINIO_VERSION"
}

components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(kubernetes etcd minio)
for c in "${components[@]}"; do
  case "$c" in
    kubernetes) build_component kubernetes "$KUBERNETES_VERSION" \
                  kube-apiserver kube-controller-manager kube-scheduler kubectl -- build_kubernetes ;;
    etcd) build_component etcd "$ETCD_VERSION" etcd -- build_etcd ;;
    minio) build_component minio "$MINIO_VERSION" minio -- build_minio ;;
    *) log "unknown component: $c"; exit 2 ;;
  esac
done
