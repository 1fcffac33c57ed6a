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

{{- define "trellis.controlSocket" -}}
/var/run/trellis/proxy.sock
{{- end -}}

{{/* The container security context every Trellis container without SYS_ADMIN starts from. */}}
{{- define "trellis.restrictedBase" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The same for the proxy and the agent, root with CAP_SYS_ADMIN. A process holding
CAP_SYS_ADMIN can always gain privileges (it can mount, setns, load BPF), which is why
Kubernetes documents allowPrivilegeEscalation as always true for it. kube-apiserver
refuses "allowPrivilegeEscalation: false" with capabilities.add "CAP_SYS_ADMIN", but
not with "SYS_ADMIN", which is the same capability (kubernetes#119568, open): the
validation compares the literal string. So say true, as it is, and the spec stays
valid when that bug is fixed (Istio did the same for ztunnel, istio#52540). */}}
{{- define "trellis.sysAdminBase" -}}
allowPrivilegeEscalation: true
privileged: false
runAsUser: 0
readOnlyRootFilesystem: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Where the node pods (the agent's and the proxy's DaemonSets) may run. Shared by
both: an enrolled pod on a node with an agent but no proxy would have its traffic
refused. Linux only: the agent, the proxy and the CNI plugin are Linux programs. */}}
{{- define "trellis.nodePodScheduling" -}}
{{- with .Values.agent.priorityClassName -}}
priorityClassName: {{ . }}
{{ end -}}
nodeSelector:
  {{- toYaml (merge (dict "kubernetes.io/os" "linux") (.Values.agent.nodeSelector | default dict)) | nindent 2 }}
{{- with .Values.agent.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.agent.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with include "trellis.imagePullSecrets" . }}
{{ . }}
{{- end }}
{{- end -}}

{{- define "trellis.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A pod's securityContext from its component's values (appArmorProfile needs
Kubernetes >= 1.30; seLinuxOptions, e.g. type spc_t, on SELinux-enforcing hosts). */}}
{{- define "trellis.podSecurityContext" -}}
{{- $context := dict -}}
{{- with .appArmorProfile }}{{ $_ := set $context "appArmorProfile" . }}{{ end -}}
{{- with .seLinuxOptions }}{{ $_ := set $context "seLinuxOptions" . }}{{ end -}}
{{- with $context }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Combinations of values that the schema cannot refuse, refused by name. */}}
{{- define "trellis.checkValues" -}}
{{- if and (eq .Values.redirectMode "ebpf") (not .Values.agent.hostPID) -}}
{{- fail "redirectMode=ebpf needs agent.hostPID=true: the agent finds the pods' cgroups and the proxy's (by the pid SO_PEERCRED gives it) in the host's /proc, so it must share the host's PID namespace" -}}
{{- end -}}
{{- range .Values.agent.extraCapabilities -}}
{{- if hasPrefix "CAP_" . -}}
{{- fail (printf "agent.extraCapabilities: %s: name capabilities without the CAP_ prefix (%s), as Kubernetes does; the runtime would look for CAP_%s" . (trimPrefix "CAP_" .) .) -}}
{{- end -}}
{{- end -}}
{{- if eq (clean .Values.proxy.controlSocketDir) (clean .Values.cni.socketDir) -}}
{{- fail (printf "proxy.controlSocketDir and cni.socketDir are both %s: the proxy's pod mounts the control socket's directory, and must not reach the agent's CNI socket" .Values.cni.socketDir) -}}
{{- end -}}
{{- if and .Values.resourceQuota.enabled (not .Values.agent.priorityClassName) -}}
{{- fail "resourceQuota.enabled needs agent.priorityClassName: the quota admits the node pods by their priority class" -}}
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
