#!/usr/bin/env bash
# Runs the cluster tests against a kind cluster instead of the local test cluster: creates the cluster (or reuses
# it), builds the project's images and loads them into it, runs MinIO inside it for the pods, then runs
# `make test` on tests/cluster with RLHF_TEST_CLUSTER=kubeconfig.
#
# Needs docker, kind and kubectl on PATH (it cannot run on the project's CI machines, which have no container
# runtime). usage: tests/cluster/kind-e2e.sh [pytest args...]   (default: tests/cluster)
# Environment: KIND_CLUSTER_NAME (default rlhf-e2e), KEEP_CLUSTER=1 to keep the cluster afterwards.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
cluster="${KIND_CLUSTER_NAME:-rlhf-e2e}"
image_tag="rlhf-operator/trainer:e2e"
operator_tag="rlhf-operator/operator:e2e"
s3_namespace="rlhf-e2e-s3"

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is not on PATH" >&2; exit 2; }
done

workdir="$(mktemp -d)"
port_forward_pid=""
cleanup() {
  [[ -n "$port_forward_pid" ]] && kill "$port_forward_pid" 2>/dev/null || true
  rm -rf "$workdir"
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then kind delete cluster --name "$cluster"; fi
}
trap cleanup EXIT

if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 180s
fi
export KUBECONFIG="$workdir/kubeconfig"
kind get kubeconfig --name "$cluster" > "$KUBECONFIG"

# The images: the pods of the tests run python with torch and boto3, which the trainer image has.
[[ -f trainer_image/Dockerfile ]] || { echo "kind-e2e: trainer_image/Dockerfile is missing" >&2; exit 2; }
docker build -t "$image_tag" -f trainer_image/Dockerfile .
kind load docker-image "$image_tag" --name "$cluster"
if [[ -f operator/Dockerfile ]]; then
  docker build -t "$operator_tag" -f operator/Dockerfile .
  kind load docker-image "$operator_tag" --name "$cluster"
fi

# S3 for the pods: MinIO in the cluster, with fresh credentials; the test process reaches it by port-forward.
access_key="e2e$(openssl rand -hex 8)"
secret_key="$(openssl rand -hex 20)"
source "$repo/scripts/kind-minio.sh"
deploy_minio "$s3_namespace" "$access_key" "$secret_key"
kubectl -n "$s3_namespace" rollout status deployment/minio --timeout=300s
local_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
kubectl -n "$s3_namespace" port-forward --address 127.0.0.1 svc/minio "$local_port:9000" >/dev/null &
port_forward_pid=$!
sleep 3

export RLHF_TEST_CLUSTER=kubeconfig RLHF_TEST_IMAGE="$image_tag"
export RLHF_TEST_S3_ENDPOINT="http://minio.$s3_namespace.svc.cluster.local:9000"
export RLHF_TEST_S3_ADMIN_ENDPOINT="http://127.0.0.1:$local_port"
export RLHF_TEST_S3_ACCESS_KEY="$access_key" RLHF_TEST_S3_SECRET_KEY="$secret_key"
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(tests/cluster)
make test PYTEST_ARGS="${args[*]}"
