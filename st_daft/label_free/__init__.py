"""Training without labelled queries: a static query table started from the document route's vectors of the
vocabulary and of the corpus's tokens (:mod:`st_daft.label_free.vocabulary`,
:mod:`st_daft.label_free.token_statistics`), pseudo-queries cut from the corpus (:mod:`st_daft.label_free.corpus_texts`)
and general-domain texts (:mod:`st_daft.label_free.general_corpus`)."""
