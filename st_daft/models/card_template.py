"""st-daft's sections of the model card, and the template they are rendered with: sentence-transformers' own
template with these sections inserted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from sentence_transformers import SentenceTransformerModelCardData

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- template

RECORD_MARKER = "st-daft-record"

_ENCODERS_SECTION = """{% if daft_encoders_table %}
### Query and Document Encoders

An asymmetric retriever (st-daft): queries go through a light query route, documents through the document encoder; \
both end in the same {{ output_dimensionality }}-dimensional space.

{{ daft_encoders_table }}
{% if daft_document_encoder and daft_document_encoder.get("id") %}
The document route is [{{ daft_document_encoder["id"] }}](https://huggingface.co/{{ daft_document_encoder["id"] }})\
{%- if daft_stages %}{{ ", fine-tuned by the stages below" if daft_document_trained else \
", unchanged (frozen in every stage)" }}{% endif %}.
{% endif %}{% endif %}
"""

_SERVING_SECTION = """{% if daft_query_encoder %}
### Serving queries with the query route alone

A search service encodes its documents once, offline, with `encode_document`, and then only encodes queries. The \
query route can be exported as a plain model, `[query route modules..., Normalize]`, without the Router and the \
document encoder: its vectors equal this model's `encode_query` vectors, and it is several times faster at small \
batch sizes (sentence-transformers' `encode` walks every module of its model on each call).

With st-daft installed (`--route document` exports the document encoder instead):

```bash
st-daft export {{ model_id or "path/to/this-model" }} query-route
```

or in Python:

```python
from sentence_transformers import SentenceTransformer
from st_daft import export_route

export_route(SentenceTransformer("{{ model_id or "path/to/this-model" }}"), "query", output_path="query-route")
```

The exported folder loads with plain sentence-transformers (no st-daft, no `trust_remote_code`):

```python
from sentence_transformers import SentenceTransformer

query_model = SentenceTransformer("query-route")
query_embeddings = query_model.encode(["Which planet is known as the Red Planet?"])  # = encode_query of the full model
```
{% endif %}"""

_TRAINING_SECTION = """
## Training with st-daft

This model was trained with st-daft, with sentence-transformers' trainer, in the stages below. \
st-daft implements DAFT (Distribution-Aligned Fine-Tuning, \
[arXiv {{ daft_arxiv }}](https://arxiv.org/abs/{{ daft_arxiv }})): a light query encoder beside a strong document \
encoder collapses under plain contrastive fine-tuning unless it is first aligned to the frozen document encoder\
{%- if daft_stages | selectattr("name", "equalto", "align") | list %}, which the `align` stage does{% endif %}.\
{%- if daft_negatives and daft_negatives.get("corrected") %} Hard negatives came from a cache of document \
embeddings kept fresh by a corrector network \
([arXiv {{ corrector_arxiv }}](https://arxiv.org/abs/{{ corrector_arxiv }})).{% endif %}
{% if daft_stages_table %}
### Stages

{{ daft_stages_table }}
{% for stage in daft_stages %}{% if stage.get("description") %}
- **{{ stage["name"] }}**: {{ stage["description"] }}{% endif %}{% endfor %}
{% endif %}
{%- if daft_collapse_table %}
### Collapse statistics at the end of each stage

Measured by `st_daft.evaluation.collapse.CollapseEvaluator` on held-out texts encoded by both routes: a lower 1-NN KL
means the \
query route's embeddings are distributed like the document route's; a mean pairwise cosine near 1 means a route \
collapsed to nearly constant vectors.

{{ daft_collapse_table }}
{% endif %}
{%- if daft_negatives_table %}
### Negatives

{{ daft_negatives_table }}
{% endif %}
{%- if daft_evaluation_table %}
### Retrieval results (MTEB)

Queries encoded with `encode_query` (query route), documents with `encode_document` (document route), scored with \
MTEB (`st_daft.evaluation.mteb.evaluate_retrieval`).

{{ daft_evaluation_table }}
{% endif %}
"""

_RECORD_SECTION = (
    """
<!-- """
    + RECORD_MARKER
    + """ {{ daft_record_json }} -->
"""
)

# (section, anchor it goes before); a section whose anchor is missing is appended at the end.
_INSERTIONS = (
    (_ENCODERS_SECTION, "### Model Sources"),
    (_SERVING_SECTION, "<!--\n### Direct Usage (Transformers)"),
    (_TRAINING_SECTION, "## Training Details"),
)
_QUERY_LENGTH_LINE = "- **Maximum Query Length:** {{ query_length }} tokens"


def build_template(base_template: str) -> str:
    """sentence-transformers' template with st-daft's sections inserted before their anchors."""
    template = base_template
    appended = []
    for section, anchor in _INSERTIONS:
        if anchor in template:
            template = template.replace(anchor, section.lstrip("\n") + "\n" + anchor, 1)
        else:
            logger.warning("model card: anchor %r not found in sentence-transformers' template; appending", anchor)
            appended.append(section)
    # A static query route has no length limit: say so without a trailing "tokens".
    template = template.replace(
        _QUERY_LENGTH_LINE, '- **Maximum Query Length:** {{ query_length }}{{ " tokens" if query_length is number }}'
    )
    return template.rstrip("\n") + "\n" + "".join(appended) + _RECORD_SECTION


def _template_file() -> Path:
    """Write the combined template once per content (sentence-transformers renders from a file path)."""
    base = Path(SentenceTransformerModelCardData.__dataclass_fields__["template_path"].default)
    template = build_template(base.read_text(encoding="utf8"))
    digest = hashlib.sha256(template.encode("utf8")).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"st_daft_model_card_template_{digest}.md"
    if not path.is_file():
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(template, encoding="utf8")
        os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------------- helpers
