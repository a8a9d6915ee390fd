"""Pictures of a run, as PNG files (matplotlib, no display needed): attention maps, training
curves, the augmented samples the model sees, kNN retrievals. Each has a command under ``tools/``
and can be made at the end of a run (``HOOKS.PICTURES``)."""
