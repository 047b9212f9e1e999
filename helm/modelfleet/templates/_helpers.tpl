{{/* Chart name, cut to 63 characters (a DNS label). */}}
{{- define "modelfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Release-qualified name, at most 63 characters. A release whose name already contains the chart
name is not repeated (`helm install modelfleet ...` gives `modelfleet`, not `modelfleet-modelfleet`).
*/}}
{{- define "modelfleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of one object: fullname + "-" + suffix, within `max` characters. The fullname is cut, never
the suffix, so two objects never collide. Usage: include "modelfleet.objname" (list . "serve" 47)
*/}}
{{- define "modelfleet.objname" -}}
{{- $root := index . 0 }}{{- $suffix := index . 1 }}{{- $max := index . 2 }}
{{- $base := include "modelfleet.fullname" $root | trunc (int (sub $max (add1 (len $suffix)))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{/*
KubeRay object names. KubeRay appends a 6-character suffix to RayService/RayJob names for their
RayCluster and then "-serve-svc"/"-head-svc" to that, so it rejects RayService and RayJob names
over 47 characters and RayCluster names over 53 (ray-operator utils.MaxRay*NameLength).
*/}}
{{- define "modelfleet.rayServiceName" -}}{{ include "modelfleet.objname" (list . "serve" 47) }}{{- end }}
{{- define "modelfleet.rayJobName" -}}{{ include "modelfleet.objname" (list . "train" 47) }}{{- end }}
{{- define "modelfleet.rayClusterName" -}}{{ include "modelfleet.objname" (list . "ray" 53) }}{{- end }}
{{- define "modelfleet.serveServiceName" -}}{{ include "modelfleet.objname" (list . "http" 63) }}{{- end }}
{{- define "modelfleet.trainConfigName" -}}{{ include "modelfleet.objname" (list . "train-config" 63) }}{{- end }}

{{/* chart label value: name-version, `+` is not allowed in label values. */}}
{{- define "modelfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods (NetworkPolicy, PodMonitor). */}}
{{- define "modelfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "modelfleet.labels" -}}
helm.sh/chart: {{ include "modelfleet.chart" . }}
{{ include "modelfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelfleet
{{- end }}

{{/* The default image: the chart's repository at the chart's appVersion unless a tag is given. */}}
{{- define "modelfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where checkpoints and artifacts live: the object-store URI, else the PVC mount. */}}
{{- define "modelfleet.storagePath" -}}
{{- if .Values.storage.objectStore.uri }}{{ .Values.storage.objectStore.uri }}{{ else }}{{ .Values.storage.mountPath }}{{ end }}
{{- end }}

{{- define "modelfleet.pvcName" -}}
{{- default (include "modelfleet.objname" (list . "storage" 63)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{- define "modelfleet.apiKeySecretName" -}}
{{- default (include "modelfleet.objname" (list . "api-key" 63)) .Values.serving.apiKey.secretName }}
{{- end }}

{{/* The training config file as the job sees it (mounted from the ConfigMap). */}}
{{- define "modelfleet.trainConfigDir" -}}/etc/modelfleet/train{{- end }}

{{/* One NetworkPolicy egress rule from {cidrs, ports}: no cidrs = any address on those ports. */}}
{{- define "modelfleet.egressTo" -}}
- ports:
    {{- range .ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
  {{- with .cidrs }}
  to:
    {{- range . }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  {{- end }}
{{- end }}
