{{/*
Names. Kubernetes names are cut to 63 characters (DNS label); the RayService and RayJob names
to 47, because KubeRay appends 6 characters for the RayCluster and "-serve-svc" to that.
*/}}
{{- define "expertmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "expertmesh.fullname" -}}
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

{{/* A name with a suffix, the base cut so that the whole stays within 63 characters. */}}
{{- define "expertmesh.suffixed" -}}
{{- $base := include "expertmesh.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{/* The RayService name (at most 47 characters). */}}
{{- define "expertmesh.rayServiceName" -}}
{{- include "expertmesh.fullname" . | trunc 47 | trimSuffix "-" }}
{{- end }}

{{/* A RayJob name (at most 47 characters): dict "root" $ "suffix" "train". */}}
{{- define "expertmesh.rayJobName" -}}
{{- $base := include "expertmesh.fullname" .root | trunc (int (sub 46 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{/* The serve Service (KubeRay's RayService serve service). */}}
{{- define "expertmesh.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "expertmesh.rayServiceName" .) }}
{{- end }}

{{/* The head Service KubeRay keeps pointing at the RayService's active cluster. */}}
{{- define "expertmesh.headServiceName" -}}
{{- printf "%s-head-svc" (include "expertmesh.rayServiceName" .) }}
{{- end }}

{{- define "expertmesh.tenantsSecretName" -}}
{{- if .Values.tenants.existingSecret }}
{{- .Values.tenants.existingSecret }}
{{- else }}
{{- include "expertmesh.suffixed" (dict "root" . "suffix" "tenants") }}
{{- end }}
{{- end }}

{{- define "expertmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "expertmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "expertmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ include "expertmesh.chart" . }}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: expertmesh
{{- end }}

{{/*
Pod labels: selector labels and the component only, so that a chart version bump alone does not
roll the Ray clusters. Argument: dict "root" $ "component" "serve".
*/}}
{{- define "expertmesh.podLabels" -}}
{{ include "expertmesh.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: expertmesh
{{- end }}

{{- define "expertmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/* A shell word: as is when plain, else single-quoted with embedded single quotes escaped. */}}
{{- define "expertmesh.shellQuote" -}}
{{- $w := toString . }}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $w }}
{{- $w }}
{{- else }}
{{- printf "'%s'" (replace "'" "'\\''" $w) }}
{{- end }}
{{- end }}

{{/* The job entrypoint: dict "entrypoint" "..." "args" (list ...). */}}
{{- define "expertmesh.entrypoint" -}}
{{- $words := list .entrypoint }}
{{- range .args }}
{{- $words = append $words (include "expertmesh.shellQuote" .) }}
{{- end }}
{{- join " " $words }}
{{- end }}

{{/*
Ray `resources` start parameter as KubeRay expects it: a JSON object inside a quoted string,
e.g. '"{\"context_shard\":4}"'. Argument: the rayResources map.
*/}}
{{- define "expertmesh.rayResourcesParam" -}}
{{- $res := dict }}
{{- range $k, $v := . }}
{{- $_ := set $res $k (int $v) }}
{{- end }}
{{- printf "%q" (toJson $res) }}
{{- end }}

{{/*
Container resources with accelerators added: dict "resources" {...} "gpus" N "tpus" N.
*/}}
{{- define "expertmesh.containerResources" -}}
{{- $res := deepCopy .resources }}
{{- $requests := default (dict) $res.requests }}
{{- $limits := default (dict) $res.limits }}
{{- if gt (int (default 0 .gpus)) 0 }}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
{{- end }}
{{- if gt (int (default 0 .tpus)) 0 }}
{{- $_ := set $requests "google.com/tpu" (int .tpus) }}
{{- $_ := set $limits "google.com/tpu" (int .tpus) }}
{{- end }}
{{- toYaml (dict "requests" $requests "limits" $limits) }}
{{- end }}

{{/*
The pod template of a Ray node.
Argument: dict "root" $ "component" "serve" "node" "head"|"worker" "group" {group values}
"volumes" (list) "mounts" (list).
*/}}
{{- define "expertmesh.rayPodTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .group }}
{{- $head := eq .node "head" -}}
metadata:
  labels:
    {{- include "expertmesh.podLabels" (dict "root" $root "component" .component) | nindent 4 }}
    {{- with $g.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if not $head }}
  automountServiceAccountToken: false
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" $head }}
      image: {{ include "expertmesh.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- include "expertmesh.containerResources" (dict "resources" $g.resources "gpus" $g.gpus "tpus" $g.tpus) | nindent 8 }}
      ports:
        {{- if $head }}
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        {{- end }}
        - name: serve
          containerPort: 8000
          protocol: TCP
        - name: metrics
          containerPort: 8080
          protocol: TCP
      {{- $env := concat (default (list) $v.env) (default (list) $g.env) }}
      {{- if $head }}
      {{- with $v.head.nodeFailureDetection }}
      {{- $env = concat $env (list (dict "name" "RAY_health_check_period_ms" "value" (toString (int .periodMs))) (dict "name" "RAY_health_check_timeout_ms" "value" (toString (int .timeoutMs))) (dict "name" "RAY_health_check_failure_threshold" "value" (toString (int .failureThreshold)))) }}
      {{- end }}
      {{- end }}
      {{- with $env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .mounts }}
      volumeMounts:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  {{- with .volumes }}
  volumes:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The RayCluster spec (RayService rayClusterConfig, RayJob rayClusterSpec).
Argument: dict "root" $ "component" "serve" "groups" {workerGroups} "path" "workerGroups"
"volumes" (list) "mounts" (list).
*/}}
{{- define "expertmesh.rayClusterSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
rayVersion: {{ $v.rayVersion | quote }}
{{- if $v.rayAuth.enabled }}
authOptions:
  mode: token
  {{- with $v.rayAuth.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
enableInTreeAutoscaling: {{ $v.autoscaling.enabled }}
{{- if and (eq .component "serve") $v.head.gcsFaultTolerance.enabled }}
{{- $ft := $v.head.gcsFaultTolerance }}
gcsFaultToleranceOptions:
  redisAddress: {{ required "head.gcsFaultTolerance.redisAddress: the Redis (host:port) is needed when gcsFaultTolerance is enabled" $ft.redisAddress | quote }}
  {{- with $ft.redisPasswordSecret }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ .name }}
        key: {{ .key }}
  {{- end }}
  {{- with $ft.externalStorageNamespace }}
  externalStorageNamespace: {{ . | quote }}
  {{- end }}
{{- end }}
{{- if $v.autoscaling.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.autoscaling.upscalingMode }}
  idleTimeoutSeconds: {{ int $v.autoscaling.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  resources:
    {{- toYaml $v.autoscaling.resources | nindent 4 }}
  {{- with $v.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  enableIngress: false
  {{- $params := dict "dashboard-host" "0.0.0.0" }}
  {{- range $k, $p := $v.head.rayStartParams }}
  {{- $_ := set $params $k (toString $p) }}
  {{- end }}
  rayStartParams:
    {{- toYaml $params | nindent 4 }}
  template:
    {{- include "expertmesh.rayPodTemplate" (dict "root" $root "component" .component "node" "head" "group" $v.head "volumes" .volumes "mounts" .mounts) | nindent 4 }}
{{- $groups := list }}
{{- range $name, $g := .groups }}
{{- if not $g.disabled }}
{{- $groups = append $groups $name }}
{{- end }}
{{- end }}
{{- if $groups }}
workerGroupSpecs:
{{- range $name := $groups }}
{{- $g := get $.groups $name }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "%s.%s: minReplicas (%d) must not exceed maxReplicas (%d)" $.path $name (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s.%s: replicas (%d) must lie within minReplicas..maxReplicas (%d..%d)" $.path $name (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
  - groupName: {{ $name }}
    replicas: {{ int $g.replicas }}
    minReplicas: {{ int $g.minReplicas }}
    maxReplicas: {{ int $g.maxReplicas }}
    {{- if gt (int (default 1 $g.numOfHosts)) 1 }}
    numOfHosts: {{ int $g.numOfHosts }}
    {{- end }}
    {{- if and (hasKey (default (dict) $g.rayStartParams) "resources") $g.rayResources }}
    {{- fail (printf "%s.%s: set Ray resources in rayResources, not in rayStartParams.resources" $.path $name) }}
    {{- end }}
    {{- $params := dict }}
    {{- range $k, $p := $g.rayStartParams }}
    {{- $_ := set $params $k (toString $p) }}
    {{- end }}
    {{- with $g.rayResources }}
    {{- $_ := set $params "resources" (include "expertmesh.rayResourcesParam" .) }}
    {{- end }}
    rayStartParams:
      {{- toYaml $params | nindent 6 }}
    template:
      {{- include "expertmesh.rayPodTemplate" (dict "root" $root "component" $.component "node" "worker" "group" $g "volumes" $.volumes "mounts" $.mounts) | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes every Ray pod gets (/dev/shm, the context store's claim). */}}
{{- define "expertmesh.baseVolumes" -}}
{{- $vols := list }}
{{- if .Values.sharedMemory.enabled }}
{{- $ed := dict "medium" "Memory" }}
{{- with .Values.sharedMemory.sizeLimit }}
{{- $_ := set $ed "sizeLimit" . }}
{{- end }}
{{- $vols = append $vols (dict "name" "dshm" "emptyDir" $ed) }}
{{- end }}
{{- with .Values.serve.store.persistentVolumeClaim }}
{{- $vols = append $vols (dict "name" "kv-store" "persistentVolumeClaim" (dict "claimName" .)) }}
{{- end }}
{{- toJson $vols }}
{{- end }}

{{- define "expertmesh.baseMounts" -}}
{{- $mounts := list }}
{{- if .Values.sharedMemory.enabled }}
{{- $mounts = append $mounts (dict "name" "dshm" "mountPath" "/dev/shm") }}
{{- end }}
{{- if .Values.serve.store.persistentVolumeClaim }}
{{- $mounts = append $mounts (dict "name" "kv-store" "mountPath" .Values.serve.store.mountPath) }}
{{- end }}
{{- toJson $mounts }}
{{- end }}

{{/* The RayJob submitter pod (KubeRay fills in the `ray job submit` command). */}}
{{- define "expertmesh.submitterPodTemplate" -}}
{{- $v := .root.Values -}}
metadata:
  labels:
    {{- include "expertmesh.podLabels" (dict "root" .root "component" (printf "%s-submitter" .component)) | nindent 4 }}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-job-submitter
      image: {{ include "expertmesh.image" .root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $v.jobs.submitterResources | nindent 8 }}
{{- end }}

{{/*
Fail unless the enabled worker groups declare enough `context_shard` and `expert_group` Ray
resources for the serving mesh. Argument: dict "root" $ "groups" {workerGroups} "path" "workerGroups".
*/}}
{{- define "expertmesh.checkCapacity" -}}
{{- $v := .root.Values }}
{{- $needs := list (list "context_shard" "serve.contextShards" (int $v.serve.contextShards)) (list "expert_group" "serve.expertGroups" (int $v.serve.expertGroups)) }}
{{- range $need := $needs }}
{{- $kind := index $need 0 }}
{{- $have := 0 }}
{{- range $name, $g := $.groups }}
{{- if not $g.disabled }}
{{- $pods := mul (int (ternary $g.maxReplicas $g.replicas $v.autoscaling.enabled)) (int (default 1 $g.numOfHosts)) }}
{{- $units := int (default 0 (get (default (dict) $g.rayResources) $kind)) }}
{{- $have = add $have (mul $pods $units) }}
{{- end }}
{{- end }}
{{- if lt (int $have) (int (index $need 2)) }}
{{- fail (printf "%s is %d, but the enabled %s declare %d %s Ray resources (pods x rayResources.%s); add replicas or units" (index $need 1) (int (index $need 2)) $.path (int $have) $kind $kind) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The compute backend of the actors that reserve a Ray resource kind: the `backend` of the
enabled groups declaring it (torch where none is set); fails where they disagree.
Argument: dict "groups" {workerGroups} "kind" "context_shard" "path" "workerGroups".
*/}}
{{- define "expertmesh.backendOf" -}}
{{- $found := dict }}
{{- range $name, $g := .groups }}
{{- if and (not $g.disabled) (get (default (dict) $g.rayResources) $.kind) }}
{{- $_ := set $found (default "torch" $g.backend) $name }}
{{- end }}
{{- end }}
{{- if gt (len $found) 1 }}
{{- fail (printf "%s: the groups declaring %s disagree on backend (%s: torch, %s: jax); one mesh runs one backend per actor kind" .path .kind (get $found "torch") (get $found "jax")) }}
{{- end }}
{{- if hasKey $found "jax" }}jax{{ else }}torch{{ end }}
{{- end }}
