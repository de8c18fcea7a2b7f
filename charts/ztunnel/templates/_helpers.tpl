{{- define "weft.suffix" -}}{{ if .Values.revision }}-{{ .Values.revision }}{{ end }}{{- end -}}
{{- define "weft.name" -}}ztunnel{{ include "weft.suffix" . }}{{- end -}}
{{- define "weft.labels" -}}
app: ztunnel
app.kubernetes.io/name: ztunnel
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if .Values.revision }}
istio.io/rev: {{ .Values.revision }}
{{- end }}
{{- end -}}
{{- define "weft.selector" -}}
app: ztunnel
{{- if .Values.revision }}
istio.io/rev: {{ .Values.revision }}
{{- end }}
{{- end -}}
