"""Everything the worker writes (a PEFT adapter: adapter_writer; a full model: merged_model_writer, both
through safetensors_stream; merge-manifest.json: manifest; the result summary: result), and the promises about it (docs/cli.md, "Writing guarantees"):
the output never replaces or contains an input (overlap.py), belongs to one resource (ownership.py),
holds only finite values (finite.py), appears atomically and durably, and a killed run's leftovers are
cleaned by the next run (publish.py); a SIGTERM never makes the result lie about it (termination.py).
"""
