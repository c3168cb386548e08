"""adaptermerge's Kubernetes operator (kopf). Imported as `adaptermerge_operator`, never `operator`
(a standard-library module); it must never import torch."""
