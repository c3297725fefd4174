"""Plumbing every layer uses: crash-safe writers (:mod:`st_daft.utils.io`), the rule every command's output folder
follows (:mod:`st_daft.utils.output`) and the process-group helpers that shard work across torchrun / accelerate
processes (:mod:`st_daft.utils.distributed`)."""
