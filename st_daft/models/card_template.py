"""The model card's Jinja templates, kept as files in ``st_daft/resources/model_card/`` (shipped in the wheel).

- ``model_card.md`` is the card's layout: sentence-transformers' SentenceTransformer card (the same sections, the same
  variables, in the same order) with a field for each st-daft section in its place. :class:`DAFTModelCardData`
  points ``template_path`` at it, so sentence-transformers' own ``generate_model_card`` renders it on every
  ``model.save()``, ``push_to_hub`` and :func:`st_daft.models.card.write_model_card`.
- ``encoders.md`` (in "Model Details", before "Model Sources"), ``serving.md`` (in "Usage", right after the direct
  usage), ``training.md`` and ``recipe.md`` (first in "Training Details") and ``evaluation.md`` (first in
  "Evaluation") are st-daft's sections, rendered by :func:`render_sections` from the card data into the
  ``daft_<name>_section`` fields the layout prints.

Why a layout of st-daft's own rather than sentence-transformers' file with text inserted into it: that template has
no blocks to fill, so an ``{% extends %}`` or ``{% include %}`` of it can only add text before or after the whole
card, and text spliced in at string anchors moves whenever a release rewords the anchor. In this layout each
section's place is fixed; tests/models/test_card.py checks that it still renders every variable of the installed
sentence-transformers' template, so a release that adds one is noticed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "resources" / "model_card"
TEMPLATE_PATH = TEMPLATE_DIR / "model_card.md"
SECTIONS = ("encoders", "serving", "training", "recipe", "evaluation")
# The HTML comment at the end of the layout that holds st-daft's records as JSON.
RECORD_MARKER = "st-daft-record"


@functools.cache
def _environment() -> jinja2.Environment:
    # trim_blocks/lstrip_blocks: a line holding only a tag leaves nothing behind, so the section files read as the
    # Markdown they render; keep_trailing_newline: each section ends exactly as written.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
    )


def render_sections(context: dict[str, Any]) -> dict[str, str]:
    """Each st-daft section rendered from the card's fields (``DAFTModelCardData.to_dict()``), as
    ``{"daft_encoders_section": ..., ...}``; a section with nothing to show is the empty string."""
    return {f"daft_{name}_section": _environment().get_template(f"{name}.md").render(context) for name in SECTIONS}
