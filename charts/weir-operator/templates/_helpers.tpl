{{/* Chart name, truncated to a DNS label. */}}
{{- define "weir-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name of the operator's objects (cluster-scoped ones too, so two releases never clash). */}}
{{- define "weir-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "weir-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weir-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "weir-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "weir-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: weir
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "weir-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weir-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "weir-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "weir-operator.leaseName" -}}
{{- default (printf "%s-leader" (include "weir-operator.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The namespaces watched with rbac.scope namespace, one per line. */}}
{{- define "weir-operator.watchNamespaces" -}}
{{- if .Values.rbac.namespaces }}
{{- range .Values.rbac.namespaces }}
{{ . }}
{{- end }}
{{- else }}
{{ .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
What the operator does in each namespace it watches, and nothing more (weir_operator.permissions
lists each rule with the code that needs it; a test keeps the two equal): kopf watches
StreamJobs, StatefulSets and pods; a reconcile reads a job, patches its finalizers and status,
server-side applies (patch, create) and deletes its StatefulSet, Service and ConfigMap, lists
its pods and creates events. No Secrets: workers get them through secretKeyRef.
*/}}
{{- define "weir-operator.namespacedRules" -}}
- apiGroups: [weir.dev]
  resources: [streamjobs]
  verbs: [get, list, watch, patch]
- apiGroups: [weir.dev]
  resources: [streamjobs/status]
  verbs: [patch]
# Owner references with blockOwnerDeletion need update on the owner's finalizers
# (where the OwnerReferencesPermissionEnforcement admission plugin runs).
- apiGroups: [weir.dev]
  resources: [streamjobs/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* The operator's ServiceAccount as the subject of a binding. */}}
{{- define "weir-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "weir-operator.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
