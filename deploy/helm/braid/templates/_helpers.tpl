{{/* Names. */}}
{{- define "braid.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "braid.fullname" -}}
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

{{/* A role's object name: <fullname>-<role>. Call with (dict "root" $ "role" "signal"). */}}
{{- define "braid.roleName" -}}
{{- printf "%s-%s" (include "braid.fullname" .root | trunc 56 | trimSuffix "-") .role }}
{{- end }}

{{- define "braid.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "braid.selectorLabels" -}}
app.kubernetes.io/name: {{ include "braid.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "braid.labels" -}}
helm.sh/chart: {{ include "braid.chart" . }}
{{ include "braid.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: braid
{{- end }}

{{/* Labels of one role's objects / its pods' selector. Call with (dict "root" $ "role" "media"). */}}
{{- define "braid.roleSelectorLabels" -}}
{{ include "braid.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "braid.roleLabels" -}}
{{ include "braid.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "braid.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "braid.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "braid.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secrets: the chart's own, or the operator's existingSecret. */}}
{{- define "braid.keysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-keys" (include "braid.fullname" .)) }}
{{- end }}
{{- define "braid.keysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}keys{{ end }}
{{- end }}

{{- define "braid.internalTLSSecretName" -}}
{{- if eq .Values.internalTLS.source "existingSecret" }}{{ .Values.internalTLS.existingSecret }}{{ else }}{{ include "braid.fullname" . }}-internal-tls{{ end }}
{{- end }}

{{- define "braid.redisSecretName" -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "braid.fullname" .)) }}
{{- end }}
{{/* Whether pods get BRAID_REDIS__PASSWORD. */}}
{{- define "braid.redisHasPassword" -}}
{{- if .Values.redis.existingSecret }}{{ if .Values.redis.existingSecretPasswordKey }}true{{ end }}
{{- else if .Values.redis.password }}true{{ end }}
{{- end }}
{{- define "braid.redisPasswordKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretPasswordKey }}{{ else }}password{{ end }}
{{- end }}
{{- define "braid.redisSentinelPasswordKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretSentinelPasswordKey }}{{ else if .Values.redis.sentinelPassword }}sentinel-password{{ end }}
{{- end }}

{{- define "braid.turnSecretName" -}}
{{- .Values.turn.existingSecret | default (printf "%s-turn" (include "braid.fullname" .)) }}
{{- end }}

{{/* host:port of the Redis the nodes use (empty in Sentinel mode). */}}
{{- define "braid.redisAddress" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "%s-redis:6379" (include "braid.fullname" .) }}
{{- else }}
{{- .Values.redis.address }}
{{- end }}
{{- end }}

{{- define "braid.routerAddress" -}}
{{- printf "%s:%d" (include "braid.roleName" (dict "root" . "role" "router")) (int .Values.router.grpcPort) }}
{{- end }}

{{/* The drain deadline plus what surrounds it: what the kubelet waits before SIGKILL. */}}
{{- define "braid.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStop.sleepSeconds) (int .Values.drain.deadlineSeconds) (int .Values.drain.graceMarginSeconds) }}
{{- end }}

{{/* Whether the media pods' UDP ports live on their node's address. */}}
{{- define "braid.mediaOnNode" -}}
{{- if or (eq .Values.media.network "hostNetwork") .Values.media.portList.hostPort }}true{{ end }}
{{- end }}

{{/*
The pod template shared by the three roles. Call with
(dict "root" $ "role" "signal" "values" .Values.signal "extraEnv" list "ports" list "affinity" dict
      "hostNetwork" bool "serviceAccount" bool).
*/}}
{{- define "braid.podTemplate" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $ctx := dict "root" $root "role" .role -}}
metadata:
  labels:
    {{- include "braid.roleSelectorLabels" $ctx | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "braid.serviceAccountName" $root }}
  automountServiceAccountToken: {{ .serviceAccount }}
  terminationGracePeriodSeconds: {{ include "braid.terminationGracePeriodSeconds" $root }}
  {{- if .hostNetwork }}
  hostNetwork: true
  dnsPolicy: ClusterFirstWithHostNet
  {{- end }}
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .role }}
      image: {{ include "braid.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args:
        - --config
        - /etc/braid/braid.yaml
        - --role
        - {{ .role }}
        - --port
        - {{ $v.httpPort | quote }}
        - --grpc-port
        - {{ $v.grpcPort | quote }}
      env:
        - name: BRAID_GRPC_BIND
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: BRAID_DRAIN_DEADLINE
          value: {{ $root.Values.drain.deadlineSeconds | quote }}
        - name: BRAID_KEYS
          valueFrom:
            secretKeyRef:
              name: {{ include "braid.keysSecretName" $root }}
              key: {{ include "braid.keysSecretKey" $root }}
        {{- if include "braid.redisHasPassword" $root }}
        - name: BRAID_REDIS__PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ include "braid.redisSecretName" $root }}
              key: {{ include "braid.redisPasswordKey" $root }}
        {{- end }}
        {{- with include "braid.redisSentinelPasswordKey" $root }}
        - name: BRAID_REDIS__SENTINEL_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ include "braid.redisSecretName" $root }}
              key: {{ . }}
        {{- end }}
        {{- if $root.Values.internalTLS.enabled }}
        - name: BRAID_INTERNAL_TLS__CA_FILE
          value: /etc/braid-tls/ca.crt
        - name: BRAID_INTERNAL_TLS__CERT_FILE
          value: /etc/braid-tls/tls.crt
        - name: BRAID_INTERNAL_TLS__KEY_FILE
          value: /etc/braid-tls/tls.key
        - name: BRAID_INTERNAL_TLS__SERVER_NAME
          value: {{ $root.Values.internalTLS.serverName | quote }}
        {{- end }}
        {{- with .extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with concat $root.Values.extraEnv $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with concat $root.Values.extraEnvFrom $v.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ $v.httpPort }}
          protocol: TCP
        - name: grpc
          containerPort: {{ $v.grpcPort }}
          protocol: TCP
        {{- with .ports }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml $root.Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml $root.Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        {{- toYaml $root.Values.probes.readiness | nindent 8 }}
      {{- if gt (int $root.Values.preStop.sleepSeconds) 0 }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", {{ $root.Values.preStop.sleepSeconds | quote }}]
      {{- end }}
      {{- with $v.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: config
          mountPath: /etc/braid
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if $root.Values.internalTLS.enabled }}
        - name: internal-tls
          mountPath: /etc/braid-tls
          readOnly: true
        {{- end }}
        {{- with concat $root.Values.extraVolumeMounts $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "braid.fullname" $root }}
    - name: tmp
      emptyDir: {}
    {{- if $root.Values.internalTLS.enabled }}
    - name: internal-tls
      secret:
        secretName: {{ include "braid.internalTLSSecretName" $root }}
        defaultMode: 0440
    {{- end }}
    {{- with concat $root.Values.extraVolumes $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range . }}
    {{- $constraint := deepCopy . }}
    {{- if not (hasKey $constraint "labelSelector") }}
    {{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "braid.roleSelectorLabels" $ctx | fromYaml)) }}
    {{- end }}
    - {{- toYaml $constraint | nindent 6 }}
    {{- end }}
  {{- end }}
{{- end }}

{{/* TURN credentials for the roles that hand ICE servers to clients (signal, media). */}}
{{- define "braid.turnEnv" -}}
{{- $t := .Values.turn }}
{{- if .Values.coturn.enabled }}
- name: BRAID_TURN__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "braid.coturnSecretName" . }}
      key: secret
{{- else if $t.enabled }}
{{- $name := include "braid.turnSecretName" . }}
{{- $own := not $t.existingSecret }}
{{- range $env, $entry := dict "BRAID_TURN__SECRET" (list $t.secret $t.existingSecretSecretKey "secret")
      "BRAID_TURN__USERNAME" (list $t.username $t.existingSecretUsernameKey "username")
      "BRAID_TURN__CREDENTIAL" (list $t.credential $t.existingSecretCredentialKey "credential") }}
{{- $key := ternary (index $entry 2) (index $entry 1) $own }}
{{- if and $key (or (not $own) (index $entry 0)) }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "braid.coturnSecretName" -}}
{{- .Values.coturn.existingSecret | default (printf "%s-coturn" (include "braid.fullname" .)) }}
{{- end }}

{{/* The URLs of the bundled coturn: TURN over UDP, TCP and TLS at coturn.domain. */}}
{{- define "braid.coturnUrls" -}}
{{- $c := .Values.coturn }}
{{- if not $c.domain }}{{ fail "coturn.domain: required with coturn.enabled (the name clients reach coturn at)" }}{{ end }}
- {{ printf "turn:%s:%d?transport=udp" $c.domain (int $c.port) }}
- {{ printf "turn:%s:%d?transport=tcp" $c.domain (int $c.port) }}
- {{ printf "turns:%s:%d?transport=tcp" $c.domain (int $c.tlsPort) }}
{{- end }}
