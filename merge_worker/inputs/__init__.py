"""Everything the worker reads from its volumes: opening beneath a volume (volume_files), typed JSON
configs (config_files, json_files), safetensors headers and tensors (safetensors_file), PEFT's
rank/alpha patterns (patterns), the claims mapped to folders (volumes), PEFT adapters read module by
module (adapters), a base model's weights (base_weights), the errors naming a bad input (errors), and the
one validation `validate` and `run` share (validation).
Torch-free, so `adaptermerge validate` works with the base install."""
