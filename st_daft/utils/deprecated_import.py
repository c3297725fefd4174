"""Old module paths, kept importable for one release: ``import st_daft.cache`` still works, warns with a
``DeprecationWarning`` naming the new path, and gives the module that now holds the code (the way
sentence-transformers kept its moved modules importable). The mapping is the package's one record of what moved;
``CHANGELOG.md`` lists the same moves."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

#: old module path -> the module that now holds its code (moved in 0.2.0; removed in 0.3.0)
MOVED_MODULES: dict[str, str] = {
    "st_daft.io": "st_daft.utils.io",
    "st_daft.distributed": "st_daft.utils.distributed",
    "st_daft.model": "st_daft.models.asymmetric",
    "st_daft.fingerprint": "st_daft.models.fingerprint",
    "st_daft.model_card": "st_daft.models.card",
    "st_daft.store": "st_daft.embeddings.store",
    "st_daft.index": "st_daft.embeddings.index",
    "st_daft.cache": "st_daft.embeddings.cache",
    "st_daft.corrector": "st_daft.negatives.corrector",
    "st_daft.mining": "st_daft.negatives.miner",
    "st_daft.baselines": "st_daft.evaluation.baselines",
    "st_daft.hybrid": "st_daft.evaluation.hybrid",
    "st_daft.collapse": "st_daft.evaluation.collapse",
    "st_daft.retrieval_evaluator": "st_daft.evaluation.retrieval_evaluator",
    "st_daft.vocabulary": "st_daft.label_free.vocabulary",
    "st_daft.corpus_alignment": "st_daft.label_free.corpus_texts",
    "st_daft.general_corpus": "st_daft.label_free.general_corpus",
    "st_daft.stages": "st_daft.training.stages",
    "st_daft.recipe": "st_daft.training.recipe",
    "st_daft.soup": "st_daft.training.soup",
}


#: names that an old module path held where a package of the same path now stands
MOVED_NAMES: dict[str, dict[str, str]] = {
    "st_daft.evaluation": {
        **dict.fromkeys(
            ("LOCAL_TASK_PREFIX", "evaluate_collections", "evaluate_retrieval", "to_mteb_task"),
            "st_daft.evaluation.mteb",
        ),
        **dict.fromkeys(("format_table", "metric_title"), "st_daft.evaluation.tables"),
        "warn_zero_query_vectors": "st_daft.evaluation.collapse",
    },
}


def moved_name(package: str, name: str) -> object:
    """A name ``package`` held before it became a package (its ``__getattr__`` asks), with a DeprecationWarning."""
    new_path = MOVED_NAMES.get(package, {}).get(name)
    if new_path is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(
        f"'{package}.{name}' moved to '{new_path}.{name}' in st-daft 0.2.0; the old path is removed in 0.3.0",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(new_path), name)


class _AliasLoader(importlib.abc.Loader):
    """Hands back the already imported new module instead of executing anything."""

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds an old module path, warns once (``sys.modules`` holds the alias afterwards) and aliases it."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        new_path = MOVED_MODULES.get(fullname)
        if new_path is None:
            return None
        warnings.warn(
            f"'{fullname}' moved to '{new_path}' in st-daft 0.2.0; the old path is removed in 0.3.0",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new_path)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(module))


def setup_deprecated_module_imports() -> None:
    """Install the finder once (``import st_daft`` does)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
