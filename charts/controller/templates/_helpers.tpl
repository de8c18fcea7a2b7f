{{- define "weft.suffix" -}}{{ if .Values.revision }}-{{ .Values.revision }}{{ end }}{{- end -}}
{{- define "weft.name" -}}weft-controller{{ include "weft.suffix" . }}{{- end -}}
{{- define "weft.labels" -}}
app: weft-controller
app.kubernetes.io/name: weft-controller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if .Values.revision }}
istio.io/rev: {{ .Values.revision }}
{{- end }}
{{- end -}}
{{- define "weft.selector" -}}
app: weft-controller
{{- if .Values.revision }}
istio.io/rev: {{ .Values.revision }}
{{- end }}
{{- end -}}
