{{/* The release's base name: the release itself when it already says edgellm. */}}
{{- define "edgellm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* This cluster's name in the federation. */}}
{{- define "edgellm.cluster" -}}
{{- .Values.cluster.name | default .Release.Name -}}
{{- end -}}

{{- define "edgellm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edgellm
{{- end -}}

{{/* Selector labels of one component: pass (dict "root" $ "component" "router"). */}}
{{- define "edgellm.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "edgellm.componentLabels" -}}
{{ include "edgellm.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: pass (dict "root" $ "image" .Values.router.image). */}}
{{- define "edgellm.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "edgellm.operator.serviceAccount" -}}
{{- .Values.operator.serviceAccount.name | default (printf "%s-operator" (include "edgellm.fullname" .)) -}}
{{- end -}}

{{/* The ClusterKopfPeering of the operator's replicas: cluster-scoped, so one per release. */}}
{{- define "edgellm.operator.peering" -}}
{{- printf "%s-operator" (include "edgellm.fullname" .) -}}
{{- end -}}

{{- define "edgellm.router.serviceAccount" -}}
{{- .Values.router.serviceAccount.name | default (printf "%s-router" (include "edgellm.fullname" .)) -}}
{{- end -}}

{{- define "edgellm.router.namespace" -}}
{{- .Values.router.namespace | default .Release.Namespace -}}
{{- end -}}

{{/*
The restricted Pod Security Standard, for the pod and for each container: non-root, no
privilege escalation, every capability dropped, RuntimeDefault seccomp, read-only root.
*/}}
{{- define "edgellm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "edgellm.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "edgellm.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
