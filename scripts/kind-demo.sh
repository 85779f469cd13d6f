#!/usr/bin/env bash
# The operator on kind, end to end: create a kind cluster, build the CPU trainer image and the operator image
# and load them into it, run MinIO in the cluster, `helm install` the chart, apply examples/kind-pipeline.yaml
# and wait until the pipeline is Succeeded.
#
# Needs docker, kind and kubectl on PATH, and helm (on PATH, or built by scripts/build-helm.sh, which needs Go).
# usage: scripts/kind-demo.sh        (make kind-demo)
# Environment: KIND_CLUSTER_NAME (default rlhf-demo), KEEP_CLUSTER=0 to delete the cluster at the end (kept by
# default, to look around: kubectl get rlhf; kubectl describe rlhf tiny).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cluster="${KIND_CLUSTER_NAME:-rlhf-demo}"
trainer_image="rlhf-operator/trainer:kind"
operator_image="rlhf-operator/operator:kind"
s3_namespace="rlhf-demo-s3"

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-demo: $tool is not on PATH" >&2; exit 2; }
done
helm="$(command -v helm || scripts/build-helm.sh)"

if [[ "${KEEP_CLUSTER:-1}" != 1 ]]; then trap 'kind delete cluster --name "$cluster"' EXIT; fi
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --wait 180s
kubectl config use-context "kind-$cluster"

echo "kind-demo: building the images"
docker build -f trainer_image/Dockerfile --build-arg VARIANT=cpu -t "$trainer_image" .
docker build -f operator/Dockerfile -t "$operator_image" .
kind load docker-image "$trainer_image" "$operator_image" --name "$cluster"

echo "kind-demo: MinIO for the artifacts"
access_key="demo$(openssl rand -hex 6)"
secret_key="$(openssl rand -hex 20)"
source "$repo/scripts/kind-minio.sh"
deploy_minio "$s3_namespace" "$access_key" "$secret_key"
kubectl -n "$s3_namespace" rollout status deployment/minio --timeout=300s

# The pipeline's namespace gets the credentials as a Secret; the bucket is made by a pod of the trainer image.
kubectl create secret generic s3-credentials --from-literal=AWS_ACCESS_KEY_ID="$access_key" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$secret_key" --dry-run=client -o yaml | kubectl apply -f -
# opted in: the operator reads no Secret without this label (README, "Security and multi-tenancy")
kubectl label secret s3-credentials rlhf-operator.io/store-credentials=true --overwrite
kubectl delete pod make-bucket --ignore-not-found
kubectl run make-bucket --image="$trainer_image" --restart=Never --image-pull-policy=IfNotPresent \
  --overrides='{"spec":{"containers":[{"name":"make-bucket","image":"'"$trainer_image"'","command":["python","-c",
  "import boto3,os; s3=boto3.client(\"s3\",endpoint_url=\"http://minio.'"$s3_namespace"'.svc:9000\",region_name=\"us-east-1\",aws_access_key_id=os.environ[\"AWS_ACCESS_KEY_ID\"],aws_secret_access_key=os.environ[\"AWS_SECRET_ACCESS_KEY\"]); names=[b[\"Name\"] for b in s3.list_buckets()[\"Buckets\"]]; \"rlhf\" in names or s3.create_bucket(Bucket=\"rlhf\")"],
  "envFrom":[{"secretRef":{"name":"s3-credentials"}}]}]}}'
kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/make-bucket --timeout=300s

echo "kind-demo: installing the chart"
"$helm" upgrade --install rlhf-operator helm/rlhf-operator --namespace rlhf-system --create-namespace \
  --set image.repository="${operator_image%:*}" --set image.tag="${operator_image##*:}" \
  --set image.pullPolicy=Never --set trainerImage="$trainer_image" \
  --set "storage.allowedEndpoints={http://minio.$s3_namespace.svc:9000}" --wait --timeout 5m

echo "kind-demo: running examples/kind-pipeline.yaml"
kubectl delete rlhf tiny --ignore-not-found --wait
kubectl apply -f examples/kind-pipeline.yaml
kubectl wait --for=jsonpath='{.status.phase}'=Succeeded rlhf/tiny --timeout=45m
kubectl get rlhf tiny
kubectl describe rlhf tiny | sed -n '/^Events:/,$p'
