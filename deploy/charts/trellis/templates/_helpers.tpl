{{/* Names and labels shared by every template. */}}

{{- define "trellis.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trellis.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "trellis.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "trellis.caAddress" -}}
https://{{ include "trellis.fullname" . }}-ca.{{ .Release.Namespace }}.svc:{{ .Values.ca.port }}
{{- end -}}

{{/* The container security context every Trellis container starts from. */}}
{{- define "trellis.restrictedBase" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Combinations of values that the schema cannot refuse, refused by name. */}}
{{- define "trellis.checkValues" -}}
{{- if and (eq .Values.redirectMode "ebpf") (not .Values.agent.hostPID) -}}
{{- fail "redirectMode=ebpf needs agent.hostPID=true: the agent finds the pods' cgroups and the proxy's (by the pid SO_PEERCRED gives it) in the host's /proc, so it must share the host's PID namespace" -}}
{{- end -}}
{{- $ports := dict -}}
{{- range $name, $port := dict "proxy.metricsPort" .Values.proxy.metricsPort "proxy.readinessPort" .Values.proxy.readinessPort "agent.metricsPort" .Values.agent.metricsPort "agent.readinessPort" .Values.agent.readinessPort -}}
{{- $key := toString $port -}}
{{- if hasKey $ports $key -}}
{{- fail (printf "%s and %s are both %s: the proxy and the agent share the pod's network namespace, so each needs a port of its own" (get $ports $key) $name $key) -}}
{{- end -}}
{{- $_ := set $ports $key $name -}}
{{- end -}}
{{- end -}}
