{{/* The release's full name, at most 63 characters. */}}
{{- define "rlhf-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rlhf-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rlhf-operator.labels" -}}
{{ include "rlhf-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "rlhf-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rlhf-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the operator does to pipelines and their children, in each namespace it watches. */}}
{{- define "rlhf-operator.pipelineRules" -}}
- apiGroups: [rlhf-operator.io]
  resources: [rlhfpipelines]
  # patch: kopf's bookkeeping annotations and the artifacts finalizer (metadata only; never spec)
  verbs: [get, list, watch, patch]
- apiGroups: [rlhf-operator.io]
  resources: [rlhfpipelines/status]
  verbs: [get, patch]
- apiGroups: [rlhf-operator.io]
  resources: [rlhfpipelines/finalizers]
  # owner references with blockOwnerDeletion on the children
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create]
- apiGroups: [""]
  resources: [pods]
  # attempts and the trainer's termination message
  verbs: [get, list]
- apiGroups: [""]
  resources: [secrets]
  # only the Secret a pipeline names in spec.storage.credentialsSecret, to verify its manifests in the store
  verbs: [get]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
