{{/*
Checks the JSON schema cannot express: values that are each valid but contradict one another.
Each message names the keys, their values and what would be valid.
*/}}
{{- define "modelfleet.validate" -}}
{{- $v := .Values }}
{{- if not (or $v.serving.enabled $v.training.enabled $v.rayCluster.enabled) }}
{{- fail "serving.enabled and training.enabled are both false (and rayCluster.enabled is false): the release would install no workload; enable at least one of them" }}
{{- end }}
{{- if not (regexMatch "^[a-z]" (include "modelfleet.fullname" .)) }}
{{- fail (printf "release name %q: KubeRay object names must start with a lowercase letter; rename the release or set fullnameOverride" (include "modelfleet.fullname" .)) }}
{{- end }}

{{- /* Fail closed: settings that open the release up need an explicit acknowledgement. */}}
{{- if and (not $v.rayAuth.enabled) (not $v.insecure.allowNoRayAuth) }}
{{- fail "rayAuth.enabled=false leaves Ray's dashboard, Jobs API and GCS without authentication (anyone who reaches them runs code on the cluster); keep it on, or set insecure.allowNoRayAuth=true to accept that" }}
{{- end }}
{{- if and (not $v.networkPolicy.enabled) (not $v.insecure.allowNoNetworkPolicy) }}
{{- fail "networkPolicy.enabled=false lets every pod in the cluster reach Ray's ports; keep it on, or set insecure.allowNoNetworkPolicy=true to accept that" }}
{{- end }}
{{- if and $v.serving.enabled (not $v.serving.apiKey.required) (not $v.insecure.allowNoApiKey) }}
{{- fail "serving.apiKey.required=false lets the application start without an API key while its pods serve on 0.0.0.0 (anyone who reaches the Service uses the models); keep it on, or set insecure.allowNoApiKey=true to accept that" }}
{{- end }}
{{- /* Object-store env is rendered as plain `value:`: a secret there would sit in the RayCluster spec. */}}
{{- range $name, $_ := $v.storage.objectStore.env }}
{{- if regexMatch "(?i)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE|API_KEY)" $name }}
{{- fail (printf "storage.objectStore.env.%s looks like a secret and would be rendered as a plain value in the Ray pods' spec; put it in storage.objectStore.credentialsSecret and name it in storage.objectStore.credentialsKeys" $name) }}
{{- end }}
{{- end }}
{{- if and $v.serving.enabled $v.serving.ingress.enabled (not $v.serving.ingress.tlsSecretName) (not $v.insecure.allowIngressWithoutTls) }}
{{- fail "serving.ingress.enabled=true without serving.ingress.tlsSecretName would carry API keys and prompts in clear text; give a TLS Secret (and serving.ingress.host), or set insecure.allowIngressWithoutTls=true to accept that" }}
{{- end }}

{{- /* Storage: exactly one of PVC and object store, so checkpoints have one home. */}}
{{- if and $v.storage.pvc.enabled $v.storage.objectStore.uri }}
{{- fail (printf "storage.pvc.enabled=true and storage.objectStore.uri=%q are both set: checkpoints and artifacts need one home; set storage.pvc.enabled=false or storage.objectStore.uri=\"\"" $v.storage.objectStore.uri) }}
{{- end }}
{{- if not (or $v.storage.pvc.enabled $v.storage.objectStore.uri) }}
{{- fail "storage.pvc.enabled=false and storage.objectStore.uri is empty: Ray workers need shared storage for checkpoints and artifacts; enable the PVC or give an object-store URI (s3://bucket/prefix)" }}
{{- end }}

{{- /* Worker groups: replica bounds, and the GPUs they can ever offer. */}}
{{- $maxGpus := 0 }}
{{- range $name, $g := $v.workerGroups }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "workerGroups.%s.minReplicas (%d) is greater than workerGroups.%s.maxReplicas (%d); minReplicas must be <= maxReplicas" $name (int $g.minReplicas) $name (int $g.maxReplicas)) }}
{{- end }}
{{- if and (hasKey $g "replicas") (or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "workerGroups.%s.replicas (%d) must be between minReplicas (%d) and maxReplicas (%d)" $name (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- $maxGpus = add $maxGpus (mul (int $g.maxReplicas) (int (default 0 $g.gpus))) }}
{{- end }}

{{- if $v.serving.enabled }}
{{- $minGpus := 0.0 }}
{{- range $i, $m := $v.serving.models }}
{{- /* Defaults as in modelfleet.config.serve (hasKey, because `default` treats 0 as unset). */}}
{{- $replicas := 1 }}{{- if hasKey $m "num_replicas" }}{{ $replicas = int $m.num_replicas }}{{ end }}
{{- with $m.autoscaling }}
{{- $min := 1 }}{{- if hasKey . "min_replicas" }}{{ $min = int .min_replicas }}{{ end }}
{{- $max := 1 }}{{- if hasKey . "max_replicas" }}{{ $max = int .max_replicas }}{{ end }}
{{- if gt $min $max }}
{{- fail (printf "serving.models[%d].autoscaling.min_replicas (%d) is greater than serving.models[%d].autoscaling.max_replicas (%d); min_replicas must be <= max_replicas" $i $min $i $max) }}
{{- end }}
{{- $replicas = $min }}
{{- end }}
{{- $gpus := 0.0 }}
{{- with $m.ray_actor_options }}{{ $gpus = float64 (default 0 .num_gpus) }}{{ end }}
{{- $minGpus = addf $minGpus (mulf $gpus $replicas) }}
{{- end }}
{{- if gt $minGpus (float64 $maxGpus) }}
{{- fail (printf "serving.models need %v GPUs at their minimum replicas (min_replicas x ray_actor_options.num_gpus) but workerGroups offer at most %d (maxReplicas x gpus); add GPU worker groups or lower the models' GPUs" $minGpus $maxGpus) }}
{{- end }}
{{- if and $v.serving.ingress.enabled $v.serving.ingress.tlsSecretName (not $v.serving.ingress.host) }}
{{- fail (printf "serving.ingress.tlsSecretName=%q needs serving.ingress.host: a TLS certificate is issued for a host name" $v.serving.ingress.tlsSecretName) }}
{{- end }}
{{- end }}

{{- if $v.training.enabled }}
{{- if and (not $v.training.shutdownAfterJobFinishes) (gt (int $v.training.ttlSecondsAfterFinished) 0) }}
{{- fail (printf "training.ttlSecondsAfterFinished=%d needs training.shutdownAfterJobFinishes=true (KubeRay rejects a TTL on a cluster it does not shut down); set it to 0 or enable shutdown" (int $v.training.ttlSecondsAfterFinished)) }}
{{- end }}
{{- $train := default dict $v.training.config.train }}
{{- /* num_workers is a count or [min, max] (elastic): the minimum must fit. */}}
{{- $minWorkers := 0 }}
{{- if kindIs "slice" $train.num_workers }}
{{- if ne (len $train.num_workers) 2 }}
{{- fail (printf "training.config.train.num_workers=%v must be a worker count or [min, max]" $train.num_workers) }}
{{- end }}
{{- $minWorkers = int (index $train.num_workers 0) }}
{{- if gt $minWorkers (int (index $train.num_workers 1)) }}
{{- fail (printf "training.config.train.num_workers=%v: min is greater than max" $train.num_workers) }}
{{- end }}
{{- else if $train.num_workers }}
{{- $minWorkers = int $train.num_workers }}
{{- end }}
{{- if and $train.use_gpu $minWorkers (gt $minWorkers $maxGpus) }}
{{- fail (printf "training.config.train.num_workers=%v with use_gpu=true needs %d GPUs at least but workerGroups offer at most %d (maxReplicas x gpus)" $train.num_workers $minWorkers $maxGpus) }}
{{- end }}
{{- end }}
{{- end }}
