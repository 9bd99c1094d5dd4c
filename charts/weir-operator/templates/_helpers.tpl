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
What the operator does in each namespace it watches: reconcile StreamJobs into StatefulSets,
Services and ConfigMaps, watch worker pods for crash loops, and record events. No Secrets:
workers get them through secretKeyRef, the operator never reads them.
*/}}
{{- define "weir-operator.namespacedRules" -}}
- apiGroups: [weir.dev]
  resources: [streamjobs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [weir.dev]
  resources: [streamjobs/status, streamjobs/scale]
  verbs: [get, patch, update]
# Owner references with blockOwnerDeletion need update on the owner's finalizers.
- apiGroups: [weir.dev]
  resources: [streamjobs/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* The operator's ServiceAccount as the subject of a binding. */}}
{{- define "weir-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "weir-operator.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
