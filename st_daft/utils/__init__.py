"""Plumbing every layer uses: crash-safe writers (:mod:`st_daft.utils.io`) and the process-group helpers that shard
work across torchrun / accelerate processes (:mod:`st_daft.utils.distributed`)."""
