{{/* Names: <release>-adaptermerge, or the release name when it already says adaptermerge. */}}
{{- define "adaptermerge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "adaptermerge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "adaptermerge.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "adaptermerge.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "adaptermerge.fullname" .) -}}
{{- end -}}

{{- define "adaptermerge.workerServiceAccountName" -}}
{{- .Values.workerServiceAccount.name | default (printf "%s-worker" (include "adaptermerge.fullname" .)) -}}
{{- end -}}

{{- define "adaptermerge.operatorSubject" -}}
- kind: ServiceAccount
  name: {{ include "adaptermerge.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{- define "adaptermerge.peeringName" -}}
{{- .Values.peering.name | default (include "adaptermerge.fullname" .) -}}
{{- end -}}

{{/* Namespaces the worker ServiceAccount must exist in: Job pods run in the AdapterMerge's namespace. */}}
{{- define "adaptermerge.workerNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- .Values.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- prepend .Values.workerServiceAccount.namespaces .Release.Namespace | uniq | toJson -}}
{{- end -}}
{{- end -}}

{{- define "adaptermerge.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .appVersion) -}}
{{- end -}}

{{/*
The operator's namespaced API use (contract with the operator code; keep both sides equal):
its own resources, the Jobs and spec ConfigMaps it creates, the Job pods it reads termination
messages (and a running search's log tail) from, the events it posts, and kopf's namespaced peering objects.
*/}}
{{- define "adaptermerge.namespacedRules" -}}
- apiGroups: [adaptermerge.io]
  resources: [adaptermerges]
  verbs: [get, list, watch, patch]
- apiGroups: [adaptermerge.io]
  resources: [adaptermerges/status]
  verbs: [patch, update]
# Owner references with blockOwnerDeletion on the Jobs and ConfigMaps need this where the
# OwnerReferencesPermissionEnforcement admission plugin is on.
- apiGroups: [adaptermerge.io]
  resources: [adaptermerges/finalizers]
  verbs: [update]
# patch: only to remove the operator's finalizer once a deleted Job's verdict is in the status.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# get pods/log: a running search's progress line, read from the tail of its worker pod's log.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, delete]
# list: the Job controller's FailedCreate events say why a worker pod cannot be created.
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- if and .Values.policy.enabled .Values.policy.claims.matchLabels }}
# The tenant policy's claim labels: the operator reads each claim a merge uses before its Job.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get]
{{- end }}
{{- end -}}

{{/* In cluster-wide mode kopf watches CRDs to learn when the served resource appears or changes. With
fixed namespaces the operator turns that scanning off (adaptermerge_operator/cli.py), so it needs none. */}}
{{- define "adaptermerge.crdReadRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end -}}

{{/* `kopf run` options (contract: passed through `adaptermerge operator ...`), as a JSON list. */}}
{{- define "adaptermerge.operatorArgs" -}}
{{- $args := list -}}
{{- if .Values.watchNamespaces -}}
{{- range .Values.watchNamespaces | uniq -}}
{{- $args = append $args (printf "--namespace=%s" .) -}}
{{- end -}}
{{- else -}}
{{- $args = append $args "--all-namespaces" -}}
{{- end -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- $args = append $args (printf "--peering=%s" (include "adaptermerge.peeringName" .)) -}}
{{- else -}}
{{- $args = append $args "--standalone" -}}
{{- end -}}
{{- $args = append $args (printf "--liveness=http://0.0.0.0:%d/healthz" (int .Values.liveness.port)) -}}
{{- concat $args .Values.extraArgs | toJson -}}
{{- end -}}
