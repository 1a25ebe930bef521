"""Training infrastructure around the pure step functions: the loop (`loop`), device
meshes and global batches (`sharding`), checkpoints (`checkpointing`), metric writers
and the console progress line."""
