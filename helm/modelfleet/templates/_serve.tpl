{{/*
serveConfigV2 of the RayService: Ray Serve's declarative config (ray.serve.schema.ServeDeploySchema)
with one application built by modelfleet.serve.app:build_app, whose args are a modelfleet
ServeConfig (modelfleet.config.serve.parse_serve_config). Models pass through verbatim.
*/}}
{{- define "modelfleet.serveConfig" -}}
{{- $s := .Values.serving }}
{{- $host := "0.0.0.0" }}
{{- $args := dict
  "storage_path" (include "modelfleet.storagePath" .)
  "api_key_env" "MODELFLEET_API_KEY"
  "require_api_key" $s.apiKey.required
  "host" $host
  "insecure_no_auth" (and (not $s.apiKey.required) .Values.insecure.allowNoApiKey)
  "max_body_bytes" $s.maxBodyBytes
  "models" $s.models }}
{{- $app := dict
  "name" $s.appName
  "route_prefix" $s.routePrefix
  "import_path" "modelfleet.serve.app:build_app"
  "args" $args }}
{{- /* 0.0.0.0 inside the pod so the Service reaches the proxy; the NetworkPolicy and API key guard it.
The app's args carry the same host, so its fail-closed check (serve/auth.py) judges the address the
pods really serve on; insecure_no_auth only where the values acknowledged it. */}}
{{- toYaml (dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" $host "port" $s.port)
  "applications" (list $app)) }}
{{- end }}
