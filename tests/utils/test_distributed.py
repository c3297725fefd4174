"""st-daft under torchrun: the helpers of st_daft.utils.distributed in a real 2-process gloo group, and a tiny 2-process
``st-daft train`` (align + fine-tuning with mined, corrected negatives) that finishes, checkpoints once, and ends
close to the 1-process run with the same global batch.

Everything runs on 127.0.0.1 with a free port; gloo on the CPU.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from st_daft import build_asymmetric_model, load_beir
from st_daft.embeddings.encode import embed_sharded
from st_daft.label_free.token_statistics import contextual_token_statistics
from st_daft.utils.distributed import get_world_size, is_main_process, local_shard
from tests.conftest import QUESTIONS, TOPICS, write_beir
from tests.training_runs import cli, finish, free_port, model_weights, start, tiny_train_args


def _torchrun(script_or_module: list[str], processes: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *script_or_module,
    ]


HELPERS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from sentence_transformers import SentenceTransformer
    from st_daft.negatives.corrector import CorrectorNetwork
    from st_daft.utils.distributed import (
        all_reduce_gradients, broadcast_parameters, get_rank, init_distributed, is_main_process, local_shard,
    )
    from st_daft.embeddings.encode import embed_sharded

    model_dir, output = sys.argv[1], sys.argv[2]
    model = SentenceTransformer(model_dir)
    assert init_distributed()
    rank = get_rank()
    texts = [f"text number {i} about cells" for i in range(7)]  # 7 rows over 2 ranks: a padded last shard
    embeddings = embed_sharded(model, texts, batch_size=2)
    from st_daft.label_free import vocabulary
    from st_daft.models.asymmetric import build_asymmetric_model
    pair = build_asymmetric_model(model_dir, "static")
    distilled_counts = []
    local_distill = vocabulary._distill_token_embeddings
    def counting(model, shard, *args):
        distilled_counts.append(len(shard))
        return local_distill(model, shard, *args)
    vocabulary._distill_token_embeddings = counting
    tokens = ["cell", "heart", "", "blood", "star", "fuse", "virus", "gene", "protein"]
    token_vectors = vocabulary.distill_token_embeddings(pair, tokens, batch_size=4, show_progress_bar=False)
    from st_daft.label_free.corpus_texts import lexical_ranking_columns
    lexical = lexical_ranking_columns(LEXICAL_DOCUMENTS, LEXICAL_TEXTS, top_k=2)
    torch.manual_seed(rank)  # different starting correctors on purpose
    corrector = CorrectorNetwork(embeddings.shape[1], depth=2)
    broadcast_parameters(corrector)
    optimizer = torch.optim.Adam(corrector.parameters(), lr=1e-2)
    for step in range(3):  # each rank trains on different rows
        optimizer.zero_grad()
        loss = (corrector(embeddings[rank::2]) - embeddings[rank::2].flip(1)).pow(2).sum()
        loss.backward()
        all_reduce_gradients(corrector)
        optimizer.step()
    state = {name: tensor.tolist() for name, tensor in corrector.state_dict().items()}
    with open(f"{output}/rank{rank}.json", "w") as handle:
        json.dump({"embeddings": embeddings.tolist(), "corrector": state, "main": is_main_process(),
                   "token_vectors": token_vectors.tolist(), "distilled": distilled_counts,
                   "lexical": lexical.tolist(), "shard": local_shard(list(range(7)))}, handle)
    """
)
LEXICAL_DOCUMENTS = ["cells divide by mitosis", "the heart pumps blood", "blood cells carry oxygen"]
LEXICAL_TEXTS = ["heart and blood", "cell division", "oxygen in blood", "mitosis", "rivers"]
HELPERS_SCRIPT = HELPERS_SCRIPT.replace(
    "import json, sys\n",
    f"import json, sys\nLEXICAL_DOCUMENTS = {LEXICAL_DOCUMENTS!r}\nLEXICAL_TEXTS = {LEXICAL_TEXTS!r}\n",
)


def test_helpers_in_a_two_process_group(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS_SCRIPT)
    log = tmp_path / "helpers.log"
    finish(start(_torchrun([str(script), str(tiny_document_model_dir), str(tmp_path)]), log), log)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["main"] for rank in ranks] == [True, False]
    # The shard each rank reads (embed_sharded's, and the vocabulary pass's): contiguous, the last one shorter.
    assert [rank["shard"] for rank in ranks] == [[0, 1, 2, 3], [4, 5, 6]]
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(tiny_document_model_dir)).encode(
        [f"text number {i} about cells" for i in range(7)], convert_to_tensor=True
    )
    for rank in ranks:  # every rank holds the full matrix, in order, equal to a 1-process encoding
        torch.testing.assert_close(torch.tensor(rank["embeddings"]), expected, rtol=1e-4, atol=1e-5)
    assert ranks[0]["corrector"] == ranks[1]["corrector"], "the correctors must stay identical across ranks"
    # The one-token distillation is split: each rank distils its own 5 or 4 of the 9 tokens and holds all 9 rows,
    # equal to one process's.
    from st_daft.label_free.vocabulary import distill_token_embeddings

    tokens = ["cell", "heart", "", "blood", "star", "fuse", "virus", "gene", "protein"]
    single = distill_token_embeddings(
        build_asymmetric_model(str(tiny_document_model_dir), "static"), tokens, batch_size=4, show_progress_bar=False
    )
    assert [rank["distilled"] for rank in ranks] == [[5], [4]]
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["token_vectors"]), single, rtol=1e-4, atol=1e-5)
    # The BM25 rankings of the corpus stage's texts are split the same way; every rank holds one process's columns.
    from st_daft.label_free.corpus_texts import lexical_ranking_columns

    lexical = lexical_ranking_columns(LEXICAL_DOCUMENTS, LEXICAL_TEXTS, top_k=2)
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["lexical"]), lexical)


def test_helpers_outside_a_process_group(tiny_document_model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_document_model_dir))
    assert is_main_process() and get_world_size() == 1
    assert local_shard([3, 1, 2]) == [3, 1, 2]
    texts = ["cells divide", "what pumps blood", "stars fuse hydrogen"]
    torch.testing.assert_close(embed_sharded(model, texts), model.encode(texts, convert_to_tensor=True))


@pytest.fixture(scope="module")
def dropout_free_model_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny document model without dropout: 1 process x 4 rows and 2 processes x 2 rows draw different dropout
    masks, which alone would make the runs differ by about one optimizer step."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("no_dropout")
    bert = BertModel.from_pretrained(str(tiny_bert_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert.save_pretrained(folder / "bert")
    BertTokenizerFast.from_pretrained(str(tiny_bert_dir)).save_pretrained(folder / "bert")
    transformer = Transformer(str(folder / "bert"), max_seq_length=64)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()]
    SentenceTransformer(modules=modules).save(str(folder / "model"))
    return folder / "model"


@pytest.fixture()
def beir_dir(tmp_path: Path) -> Path:
    """Eight training queries (two global batches of 4) and a dev split, so no query is held out."""
    corpus = {f"d-{topic}": (topic, text) for topic, text in TOPICS.items()}
    queries = {f"q-{topic}": question for topic, question in QUESTIONS.items()}
    qrels = {
        "train": {f"q-{topic}": {f"d-{topic}": 1} for topic in TOPICS},
        "dev": {f"q-{topic}": {f"d-{topic}": 1} for topic in list(TOPICS)[:3]},
    }
    return write_beir(tmp_path / "beir", corpus, queries, qrels)


def _run_args(
    document_model: Path, data: Path, output: Path, batch_size: int, *extra: str, query_encoder: str = "static"
) -> list[str]:
    args = tiny_train_args(
        document_model,
        data,
        output,
        "--dev-split",
        "dev",
        "--query-encoder",
        query_encoder,
        "--stages",
        "align,finetune",  # DAFT's two stages (a static route's default adds the label-free ones)
        "--device",
        "cpu",  # gloo on CPU: accelerate needs use_cpu to see a CPU process group (evaluator metrics broadcast)
        "--align-steps",
        "4",
        "--finetune-steps",
        "4",
        "--keep-checkpoints",
        *extra,
    )
    for flag in ("--batch-size", "--align-batch-size"):
        args[args.index(flag) + 1] = str(batch_size)
    return args


def _assert_checkpointed_once(output: Path) -> None:
    for stage in ("stage-1-align", "stage-2-finetune"):  # one set of checkpoints, written once
        names = sorted(path.name for path in (output / stage).glob("checkpoint-*"))
        assert names == ["checkpoint-2", "checkpoint-4"], (stage, names)
        state = json.loads((output / stage / "checkpoint-4" / "trainer_state.json").read_text())
        assert state["global_step"] == 4
    assert not list(output.rglob("*.tmp")) and not list(output.rglob("*.old"))
    summary = json.loads((output / "daft_summary.json").read_text())
    assert [stage["steps"] for stage in summary["stages"]] == [4, 4]


def test_two_process_training_matches_one_process(dropout_free_model_dir: Path, beir_dir: Path, tmp_path: Path):
    """Align + fine-tuning with in-batch negatives: 2 processes x 2 pairs against 1 process x 4 pairs (static query
    route, document model without dropout: nothing random but the data order, which the seed fixes)."""
    two, one = tmp_path / "two", tmp_path / "one"
    two_log, one_log = tmp_path / "two.log", tmp_path / "one.log"
    # The variance guard is a statistic of each rank's own batch (2 rows, not 4): without it the runs agree to float
    # precision; with it they differ by about one optimizer step.
    guard = ("--guard", "none")
    two_args = _run_args(dropout_free_model_dir, beir_dir, two, 2, *guard)
    two_run = start(_torchrun(["-m", "st_daft.cli", *two_args]), two_log)
    one_run = start(cli(_run_args(dropout_free_model_dir, beir_dir, one, 4, *guard)), one_log)
    finish(two_run, two_log)
    finish(one_run, one_log)
    _assert_checkpointed_once(two)
    two_weights, one_weights = model_weights(two), model_weights(one)
    assert two_weights.keys() == one_weights.keys()
    for name in two_weights:  # same batches, gathered in-batch negatives, averaged gradients: float-level differences
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=1e-3, atol=1e-5, msg=name)


def test_two_process_training_with_corrected_negatives(tiny_document_model_dir: Path, beir_dir: Path, tmp_path):
    """Mining from the (sharded-then-gathered) cache with a synchronised corrector finishes and checkpoints once; the
    cache is a float16 file on disk, written by the main process and mapped by both, and so is the corpus the
    refresh before step 3 re-embeds."""
    output, log = tmp_path / "two", tmp_path / "two.log"
    negatives = ("--negatives", "corrected+refresh:2", "--num-negatives", "2", "--cache-on-disk", "--cache-dtype")
    args = _run_args(tiny_document_model_dir, beir_dir, output, 2, *negatives, "float16", query_encoder="tiny:1,32")
    finish(start(_torchrun(["-m", "st_daft.cli", *args]), log), log)
    _assert_checkpointed_once(output)
    finetune = output / "stage-2-finetune"
    states = {}
    for step in (2, 4):
        mining = finetune / f"checkpoint-{step}" / "negative_mining"
        states[step] = json.loads((mining / "miner_state.json").read_text())
        assert (mining / "corrector" / "corrector.pt").is_file()
    assert states[4]["statistics"]["counts"]["negatives"] > 0 and states[4]["statistics"]["num_refreshes"] == 1
    # One document route, the align stage's, which mining starts from.
    (cache,) = (output / "corpus-cache").glob("*/cache_metadata.json")
    assert json.loads(cache.read_text())["dtype"] == "float16"
    assert log.read_text().count("(memory-mapped)") == 2, "built once, logged by each process"
    # A checkpoint's mining state refers to the cache where it is instead of copying it beside the checkpoints:
    # before the refresh the one built, after it the re-embedded corpus, written on disk by the main process.
    mining_2, mining_4 = (finetune / f"checkpoint-{step}" / "negative_mining" for step in (2, 4))
    assert (mining_2 / states[2]["cache"]["folder"]).resolve() == cache.parent.resolve()
    (refreshed,) = (finetune / "negative_mining_cache").glob("*/cache_metadata.json")
    assert (mining_4 / states[4]["cache"]["folder"]).resolve() == refreshed.parent.resolve()
    metadata = json.loads(refreshed.read_text())
    assert metadata["dtype"] == "float16" and metadata["fingerprint"] == states[4]["cache"]["fingerprint"]
    assert log.read_text().count(f"re-embedded ({metadata['size']} documents), on disk in") == 2, "mapped by both"
    assert not list(output.rglob("*.tmp*"))


def test_two_process_label_free_stages(tiny_document_model_dir: Path, beir_dir: Path, tmp_path: Path):
    """The static default (vocabulary with contextual token vectors summed over both processes' shards of the corpus,
    corpus with its pseudo-query term over the sharded-then-gathered corpus embeddings, here on a sample of the corpus
    whose teacher neighbours each process searches for half the texts, align) under torchrun: finishes, the token
    statistics equal one process's, and the corpus stage checkpoints once."""
    output, log = tmp_path / "two", tmp_path / "two.log"
    args = tiny_train_args(
        tiny_document_model_dir,
        beir_dir,
        output,
        "--dev-split",
        "dev",
        "--device",
        "cpu",
        "--corpus-steps",
        "2",
        "--corpus-max-texts",
        "24",
        "--general-texts",
        "0",  # 24 texts alone, so that no batch fills
        "--align-steps",
        "2",
        "--corpus-document-weight",
        "1",
        "--contextual-vocabulary",
        "on",
        "--corpus-sample-size",
        "3",  # a sample of the corpus each step, as above 65,536 documents; neighbours searched on both processes
        "--keep-checkpoints",
    )
    finish(start(_torchrun(["-m", "st_daft.cli", *args]), log), log)
    summary = json.loads((output / "daft_summary.json").read_text())
    assert [stage["name"] for stage in summary["stages"]] == ["vocabulary", "corpus", "align"]
    assert summary["stages"][1]["extra"]["corpus_sample_size"] == 3
    assert "each step scores 3 of the corpus's" in log.read_text()
    assert [stage["steps"] for stage in summary["stages"][1:]] == [2, 2]
    assert summary["stages"][1]["extra"]["document_weight"] == 1.0, "the pseudo-query term is on"
    # 24 texts over 2 processes fill no batch of 128 x 2: the batch shrinks instead of the stage training 0 steps
    assert "fill no batch of 128 x 2 processes; the batch size is 12 per process" in log.read_text()
    assert sorted(path.name for path in (output / "stage-0-corpus").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not list(output.rglob("*.tmp")) and not list(output.rglob("*.old"))
    assert summary["stages"][0]["extra"]["contextual_tokens"] > 0
    (kept,) = (output / "stage-vocabulary").glob("token-statistics-*.pt")
    single = build_asymmetric_model(str(tiny_document_model_dir), "static")
    documents = list(load_beir(beir_dir, "train").corpus.values())
    # The vocabulary pass, sharded across the processes and all-gathered, is the corpus cache: not encoded again.
    assert f"embeddings of {len(documents)} documents, from an earlier pass" in log.read_text()
    sums, counts, _ = contextual_token_statistics(single, documents, show_progress_bar=False)
    two_process = torch.load(kept)
    assert torch.equal(two_process["counts"], counts)
    torch.testing.assert_close(two_process["sums"], sums, atol=1e-4, rtol=1e-4)
