"""A sample of the corpus in place of all of it: which rows, their weights, and the estimate they give."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from st_daft.losses.corpus_sample import DEFAULT_SAMPLE_SIZE, FULL_CORPUS_LIMIT, resolve_sample_size, sample_corpus


def test_the_whole_corpus_up_to_the_limit_and_a_sample_above() -> None:
    assert resolve_sample_size(FULL_CORPUS_LIMIT, None) is None
    assert resolve_sample_size(FULL_CORPUS_LIMIT + 1, None) == DEFAULT_SAMPLE_SIZE
    assert resolve_sample_size(10**7, 0) is None  # 0: the whole corpus always
    assert resolve_sample_size(1000, 1000) is None and resolve_sample_size(1000, 999) == 999
    with pytest.raises(ValueError, match="0 \\(the whole corpus\\) or more"):
        resolve_sample_size(1000, -1)


def test_a_sample_holds_the_required_rows_then_uniform_rows_of_the_rest() -> None:
    generator = torch.Generator().manual_seed(0)
    corpus = torch.randn(1000, 8)
    sample = sample_corpus(corpus, torch.tensor([5, 3, 3, -1, 900]), 200, "cpu", torch.tensor([7, 8, 5]), generator)
    assert sample.num_required == 3 and sample.rows[:3].tolist() == [3, 5, 900]
    drawn = sample.rows[3:]
    assert 150 < len(drawn) <= 197 and not set(drawn.tolist()) & {3, 5, 900, 7, 8}
    assert torch.equal(sample.embeddings, corpus[sample.rows])
    assert sample.log_weights[:3].tolist() == [0.0, 0.0, 0.0]
    # 1,000 rows less 3 required and 2 excluded (5 is required, not excluded), stood for by the drawn rows
    assert sample.log_weights[3:].allclose(torch.tensor(math.log(995 / len(drawn))))
    assert sample.columns(torch.tensor([[900, -1], [3, 5]])).tolist() == [[2, -1], [0, 1]]
    with pytest.raises(ValueError, match="not among the sample's required rows"):
        sample.columns(torch.tensor([4]))
    with pytest.raises(ValueError, match="the corpus has 1000 documents"):
        sample_corpus(corpus, torch.tensor([1000]), 200, "cpu")
    crowded = sample_corpus(corpus, torch.arange(300), 200, "cpu")  # more required rows than the sample size
    assert crowded.rows.tolist() == list(range(300)) and crowded.log_weights.abs().sum() == 0


def test_a_memory_mapped_float16_corpus_is_read_where_it_is(tmp_path) -> None:
    values = np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float16)
    np.save(tmp_path / "corpus.npy", values)
    corpus = torch.from_numpy(np.load(tmp_path / "corpus.npy", mmap_mode="c"))
    sample = sample_corpus(corpus, torch.tensor([4999, 0]), 64, "cpu", generator=torch.Generator().manual_seed(1))
    assert sample.embeddings.dtype == torch.float32
    assert torch.equal(sample.embeddings, torch.from_numpy(values[sample.rows.numpy()].astype(np.float32)))


def test_the_weighted_sample_estimates_the_whole_corpus_softmax() -> None:
    """Averaged over draws, the weighted sample's partition function is the whole corpus's; unweighted it is not."""
    generator = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(20000, 32, generator=generator), dim=1)
    query = torch.nn.functional.normalize(torch.randn(32, generator=generator), dim=0)
    logits = 20 * corpus @ query
    best = logits.topk(16).indices
    whole = torch.logsumexp(logits, dim=0).item()
    weighted, unweighted = [], []
    for _ in range(200):
        sample = sample_corpus(corpus, best, 1024, "cpu", generator=generator)
        scores = 20 * sample.embeddings @ query
        weighted.append(torch.logsumexp(scores + sample.log_weights, dim=0).exp().item())
        unweighted.append(torch.logsumexp(scores, dim=0).item())
    assert math.log(np.mean(weighted)) == pytest.approx(whole, abs=0.02)
    assert whole - np.mean(unweighted) > 0.5  # without the weights most of the other 19,000 rows are missed
