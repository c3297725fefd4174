"""st_daft.label_free.general_corpus: the general texts that ship with the package."""

from __future__ import annotations

import pytest


def test_general_texts_ship_with_the_package() -> None:
    from st_daft import general_texts

    texts = general_texts()
    assert len(texts) == 20000 and all(text.strip() == text and text for text in texts)
    assert len(set(texts)) == 19999, "one example sentence belongs to two synsets; the corpus stage drops repeats"
    assert general_texts(5) == texts[:5] and general_texts(0) == []
    assert sum(":" in text for text in texts) > 5000, "definitions ('lemma: definition') and example sentences"
    with pytest.raises(ValueError, match="between 0 and 20000"):
        general_texts(20001)
