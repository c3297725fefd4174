"""Hard negatives from a stale cache (Monath et al. 2024): which strategy and when the cache is re-embedded
(:mod:`st_daft.negatives.strategy`), the corrector network that maps stale rows towards the current document route
(:mod:`st_daft.negatives.corrector`), and the miner that scores the (corrected) cache
(:mod:`st_daft.negatives.miner`)."""
