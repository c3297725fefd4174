"""The asymmetric model and what describes it: the query and document routes on sentence-transformers' ``Router``
(:mod:`st_daft.models.asymmetric`), fingerprints that identify a route's weights (:mod:`st_daft.models.fingerprint`),
and the model card that records how it was trained (:mod:`st_daft.models.card`)."""
