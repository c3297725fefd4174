"""A soup of static query routes: several runs' tables averaged into one model (st_daft.training.soup, st-daft soup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer

from st_daft import build_asymmetric_model, get_route, soup_static_routes
from st_daft.cli import main


def _runs(tiny_document_model_dir: Path, tmp_path: Path, count: int = 2) -> list[Path]:
    """``count`` static models sharing the document route, with different tables (as runs of other seeds)."""
    folders = []
    for seed in range(count):
        model = build_asymmetric_model(str(tiny_document_model_dir), "static", device="cpu")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            table = get_route(model, "query")[0].embedding.weight
            table.copy_(torch.randn(table.shape, generator=generator) * (seed + 1))
        folder = tmp_path / f"run-{seed}"
        model.save(str(folder))
        folders.append(folder)
    return folders


def _table(model) -> torch.Tensor:
    return get_route(model, "query")[0].embedding.weight.detach()


def test_soup_averages_scaled_tables_and_loads_in_plain_sentence_transformers(
    tiny_document_model_dir: Path, tmp_path: Path
) -> None:
    runs = _runs(tiny_document_model_dir, tmp_path)
    tables = [_table(SentenceTransformer(str(run), device="cpu")) for run in runs]
    scaled = [table / table.norm(dim=1).mean() for table in tables]
    expected = (scaled[0] + scaled[1]) / 2 * tables[0].norm(dim=1).mean()
    output = tmp_path / "soup"
    soup = soup_static_routes(runs, output_path=output)
    torch.testing.assert_close(_table(soup), expected)
    reloaded = SentenceTransformer(str(output), device="cpu")
    torch.testing.assert_close(_table(reloaded), expected)
    texts = ["cells divide", "the heart pumps"]
    torch.testing.assert_close(
        torch.from_numpy(reloaded.encode_document(texts)),
        torch.from_numpy(SentenceTransformer(str(runs[0]), device="cpu").encode_document(texts)),
    )  # the document route is the runs' own
    assert json.loads((output / "daft_soup.json").read_text())["runs"] == [str(run) for run in runs]

    # A model object passed in is not changed.
    first = SentenceTransformer(str(runs[0]), device="cpu")
    before = _table(first).clone()
    soup_static_routes([first, str(runs[1])])
    torch.testing.assert_close(_table(first), before)


def test_soup_refuses_what_it_cannot_average(tiny_document_model_dir: Path, tmp_path: Path) -> None:
    runs = _runs(tiny_document_model_dir, tmp_path)
    with pytest.raises(ValueError, match="two or more"):
        soup_static_routes(runs[:1])
    with pytest.raises(ValueError, match="exists"):
        soup_static_routes(runs, output_path=runs[0])
    tiny = build_asymmetric_model(str(tiny_document_model_dir), "tiny:1,32", device="cpu")
    with pytest.raises(ValueError, match="not one StaticEmbedding"):
        soup_static_routes([str(runs[0]), tiny])
    moved = SentenceTransformer(str(runs[1]), device="cpu")
    with torch.no_grad():
        next(get_route(moved, "document").parameters()).add_(0.01)
    with pytest.raises(ValueError, match="another document route"):
        soup_static_routes([str(runs[0]), moved])


def test_cli_soup(tiny_document_model_dir: Path, tmp_path: Path, capsys) -> None:
    runs = _runs(tiny_document_model_dir, tmp_path, count=3)
    output = tmp_path / "soup"
    assert main(["soup", *map(str, runs), "--output", str(output)]) == 0
    assert "soup of 3 static query tables" in capsys.readouterr().out
    assert (output / "daft_soup.json").is_file()
    assert main(["soup", *map(str, runs), "--output", str(output)]) == 2, "an existing folder is not replaced"
    assert "holds an earlier `st-daft soup` output" in capsys.readouterr().err
