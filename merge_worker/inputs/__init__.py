"""Everything the worker reads from its volumes: opening beneath a volume (volume_files), typed JSON
configs (config_files, json_files), safetensors headers and tensors (safetensors_file), PEFT's
rank/alpha patterns (patterns), and the one validation `validate` and `run` share (validation).
Torch-free, so `adaptermerge validate` works with the base install."""
