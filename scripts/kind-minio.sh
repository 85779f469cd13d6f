# Sourced by scripts/kind-demo.sh and tests/cluster/kind-e2e.sh: MinIO in the current kubectl context.
# usage: deploy_minio NAMESPACE ACCESS_KEY SECRET_KEY
# Creates the namespace, the minio-root Secret (the credentials), a MinIO Deployment and its Service on port
# 9000, and restarts the Deployment so a reused cluster picks up fresh credentials.
deploy_minio() {
  local namespace="$1" access_key="$2" secret_key="$3"
  kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$namespace" create secret generic minio-root \
    --from-literal=MINIO_ROOT_USER="$access_key" --from-literal=MINIO_ROOT_PASSWORD="$secret_key" \
    --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n "$namespace" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: minio}
spec:
  selector: {matchLabels: {app: minio}}
  template:
    metadata: {labels: {app: minio}}
    spec:
      containers:
        - name: minio
          image: quay.io/minio/minio:latest
          args: [server, /data]
          envFrom: [{secretRef: {name: minio-root}}]
          ports: [{containerPort: 9000}]
          readinessProbe: {httpGet: {path: /minio/health/ready, port: 9000}}
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: minio}
spec:
  selector: {app: minio}
  ports: [{port: 9000, targetPort: 9000}]
YAML
  kubectl -n "$namespace" rollout restart deployment/minio
}
