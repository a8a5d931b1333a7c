"""A run's files: HDF5 checkpoints and metrics, atomic writes, the output lock."""
