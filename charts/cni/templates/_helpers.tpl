{{- define "weft.suffix" -}}{{ if .Values.revision }}-{{ .Values.revision }}{{ end }}{{- end -}}
{{- define "weft.name" -}}weft-cni{{ include "weft.suffix" . }}{{- end -}}
{{- define "weft.labels" -}}
app: weft-cni
app.kubernetes.io/name: weft-cni
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if .Values.revision }}
istio.io/rev: {{ .Values.revision }}
{{- end }}
{{- end -}}
{{- define "weft.selector" -}}
app: weft-cni
{{- if .Values.revision }}
istio.io/rev: {{ .Values.revision }}
{{- end }}
{{- end -}}
