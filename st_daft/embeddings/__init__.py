"""Document vectors: embedding a corpus with the document route, sharded across processes
(:mod:`st_daft.embeddings.encode`); a persistent store keyed by route and text (:mod:`st_daft.embeddings.store`); the
stale corpus cache that DAFT's alignment and corrector-network mining read (:mod:`st_daft.embeddings.cache`); and
faiss indexes over them (:mod:`st_daft.embeddings.index`)."""
