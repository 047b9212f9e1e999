{{/*
The one RayCluster spec, shared by the RayService (rayClusterConfig), the RayJob
(rayClusterSpec) and the optional standalone RayCluster (spec), so the three can never drift.
Call with (dict "root" $ "role" "serving"|"training"|"cluster"); the role only decides which
secrets and files the pods get (the API key for serving, the training config for training).
*/}}
{{- define "modelfleet.clusterSpec" -}}
{{- $root := .root }}{{- $v := $root.Values -}}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: {{ $v.autoscaling.enabled }}
{{- if $v.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ $v.autoscaling.idleTimeoutSeconds }}
  upscalingMode: {{ $v.autoscaling.upscalingMode }}
  {{- with $v.autoscaling.resources }}
  resources: {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext: {{- toYaml $v.containerSecurityContext | nindent 4 }}
{{- end }}
{{- if $v.rayAuth.enabled }}
authOptions:
  mode: token
  {{- with $v.rayAuth.existingSecret }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
headGroupSpec:
  # Dashboard/Jobs (8265) and client (10001) stay on a ClusterIP Service: reach them with
  # `kubectl port-forward`, never through a LoadBalancer or the Ingress.
  serviceType: ClusterIP
  rayStartParams:
    {{- /* The head never gets GPUs: it runs the GCS, dashboard, autoscaler and job drivers. */}}
    {{- toYaml (merge (dict "num-gpus" "0" "dashboard-host" "0.0.0.0") $v.head.rayStartParams) | nindent 4 }}
  template:
    {{- include "modelfleet.podTemplate" (dict "root" $root "role" .role "container" "ray-head" "group" $v.head "gpus" 0 "head" true) | nindent 4 }}
workerGroupSpecs:
{{- range $name, $g := $v.workerGroups }}
  - groupName: {{ $name }}
    replicas: {{ default $g.minReplicas $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    rayStartParams: {{- toYaml (default dict $g.rayStartParams) | nindent 6 }}
    template:
      {{- include "modelfleet.podTemplate" (dict "root" $root "role" $.role "container" "ray-worker" "group" $g "gpus" (default 0 $g.gpus) "head" false) | nindent 6 }}
{{- end }}
{{- end }}

{{/* A Ray pod template (head or one worker group). */}}
{{- define "modelfleet.podTemplate" -}}
{{- $root := .root }}{{- $v := $root.Values }}{{- $g := .group -}}
metadata:
  labels:
    {{- include "modelfleet.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
spec:
  {{- /* Only the head's in-tree autoscaler talks to the Kubernetes API; no other pod gets a token. */}}
  automountServiceAccountToken: {{ and .head $v.autoscaling.enabled | ternary true false }}
  securityContext: {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations: {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ default (include "modelfleet.image" $root) $g.image }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      ports:
        {{- if .head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: metrics, containerPort: 8080}
        {{- if eq .role "serving" }}
        - {name: serve, containerPort: {{ $v.serving.port }}}
        {{- end }}
      env:
        # Same as the CLI (modelfleet/cli/__init__.py): no usage reporting from users' clusters.
        - {name: RAY_USAGE_STATS_ENABLED, value: "0"}
        {{- if eq (int .gpus) 0 }}
        # DeepSpeed would probe for CUDA; on CPU pods name the accelerator outright.
        - {name: DS_ACCELERATOR, value: cpu}
        {{- end }}
        {{- if and (eq .role "serving") $v.serving.haproxy.enabled }}
        # Serve's ingress mode is a property of the cluster, read when Serve's processes start
        # (modelfleet.cluster.haproxy sets the same on `modelfleet cluster up`).
        - {name: RAY_SERVE_ENABLE_HA_PROXY, value: "1"}
        - {name: RAY_SERVE_HAPROXY_NBTHREAD, value: {{ $v.serving.haproxy.threads | quote }}}
        - {name: RAY_SERVE_HAPROXY_RETRY_ON, value: {{ $v.serving.haproxy.retryOn | quote }}}
        # Ray runs HAProxy through the project's edge wrapper (in the image), which adds the request
        # head deadline Ray 2.60 cannot set and binds stats/exporter to loopback.
        - {name: RAY_SERVE_HAPROXY_BINARY_PATH, value: {{ printf "%s/src/modelfleet/cluster/haproxy_edge.py" $v.image.appDir | quote }}}
        - {name: MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S, value: {{ $v.serving.haproxy.httpRequestTimeoutS | quote }}}
        - {name: RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S, value: {{ $v.serving.haproxy.timeoutClientS | quote }}}
        - {name: RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S, value: {{ $v.serving.haproxy.timeoutServerS | quote }}}
        # The cache-aware router reads the prompt (modelfleet.cluster.haproxy: the same values).
        - {name: RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY, value: "1"}
        - {name: RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S, value: "1"}
        - {name: RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE, value: "1114112"}
        - {name: RAY_SERVE_HAPROXY_MAXCONN, value: "512"}
        - {name: RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE, value: "2"}
        {{- end }}
        {{- if eq .role "serving" }}
        # Read by the Serve ingress replica (serveConfigV2 args.api_key_env); only a reference here.
        - name: MODELFLEET_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "modelfleet.apiKeySecretName" $root }}
              key: {{ $v.serving.apiKey.secretKey }}
        {{- end }}
        {{- with $v.storage.objectStore }}
        {{- if and .uri .credentialsSecret }}
        {{- range $envName, $key := .credentialsKeys }}
        - name: {{ $envName }}
          valueFrom:
            secretKeyRef:
              name: {{ $.root.Values.storage.objectStore.credentialsSecret }}
              key: {{ $key }}
        {{- end }}
        {{- end }}
        {{- if .uri }}
        {{- range $envName, $value := .env }}
        - {name: {{ $envName }}, value: {{ $value | quote }}}
        {{- end }}
        {{- end }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- $res := dict "cpu" (toString $g.cpu) "memory" (toString $g.memory) }}
        {{- if gt (int .gpus) 0 }}{{- $_ := set $res $v.gpuResourceName (int .gpus) }}{{- end }}
        # Requests equal limits: Ray sizes itself from the limits, and a node that overcommits
        # them makes DeepSpeed ranks and Serve replicas fail unpredictably.
        requests: {{- toYaml $res | nindent 10 }}
        limits: {{- toYaml $res | nindent 10 }}
      securityContext: {{- toYaml $v.containerSecurityContext | nindent 8 }}
      volumeMounts:
        # Ray's object store and NCCL need more than the default 64 MiB of /dev/shm.
        - {name: dshm, mountPath: /dev/shm}
        {{- if $v.storage.pvc.enabled }}
        - {name: storage, mountPath: {{ $v.storage.mountPath }}}
        {{- end }}
        {{- if eq .role "training" }}
        - {name: train-config, mountPath: {{ include "modelfleet.trainConfigDir" $root }}, readOnly: true}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir: {medium: Memory}
    {{- if $v.storage.pvc.enabled }}
    - name: storage
      persistentVolumeClaim: {claimName: {{ include "modelfleet.pvcName" $root }}}
    {{- end }}
    {{- if eq .role "training" }}
    - name: train-config
      configMap: {name: {{ include "modelfleet.trainConfigName" $root }}}
    {{- end }}
{{- end }}
