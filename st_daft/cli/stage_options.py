"""``st-daft train``'s stage options, derived from the stage fields (:func:`~st_daft.training.stages.settings.setting`):
one flag a declared field, ``--set STAGE.FIELD=VALUE`` for any field, and ``--recipe FILE`` for a saved recipe; and
the :class:`~st_daft.training.recipe.DAFTConfig` they make.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from st_daft.training.recipe import DAFTConfig
from st_daft.training.stages import STAGE_TYPES
from st_daft.training.stages.settings import SettingError, coerce_setting, flag_fields

GROUP_TITLES = {
    "vocabulary": "vocabulary stage",
    "corpus": "corpus stage",
    "align": "align stage (DAFT stage 1)",
    "finetune": "fine-tuning stage (DAFT stage 2)",
}


def _dest(stage: str, field: str) -> str:
    return f"stage:{stage}.{field}"


def add_stage_options(parser: argparse.ArgumentParser) -> None:
    """One flag for each stage field declared with one, in a group per stage; their default is None (not given)."""
    for stage, stage_type in STAGE_TYPES.items():
        fields = flag_fields(stage_type)
        if not fields:
            continue
        group = parser.add_argument_group(GROUP_TITLES.get(stage, f"{stage} stage"))
        for field in fields:
            options = dict(field.metadata["argparse"])
            options.setdefault("default", None)
            if "action" not in options or options["action"] == "append":
                if "choices" not in options:
                    options.setdefault("metavar", field.metadata["flag"].lstrip("-").upper().replace("-", "_"))
            group.add_argument(
                field.metadata["flag"], dest=_dest(stage, field.name), help=field.metadata["help"], **options
            )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="STAGE.FIELD=VALUE",
        help="set any field of a stage, repeatable (e.g. --set align.max_steps=3, --set finetune.scale=30); VALUE "
        "is read as JSON where it parses, else as text; it overrides the stage's flags and --recipe",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="RECIPE",
        help="train with a saved recipe: a daft_recipe.json, a model folder holding one, or a Hub model id; its "
        "encoders, stages, every stage setting, seed, precision and cache type; flags and --set beside it override it",
    )


def given_stage_flags(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """``(stage, flag as given, is a budget)`` for every stage flag on the command line."""
    given = []
    for stage, stage_type in STAGE_TYPES.items():
        for field in flag_fields(stage_type):
            value = getattr(args, _dest(stage, field.name), None)
            if value is None:
                continue
            text = field.metadata["flag"]
            if isinstance(value, list):  # --mining-index-option KEY=VALUE, repeated
                value = " ".join(f"{key}={item}" for key, item in value)
            if field.metadata["argparse"].get("action") != "store_const":
                text = f"{text} {value}"
            given.append((stage, text, field.metadata["budget"]))
    return given


def check_stage_flags(args: argparse.Namespace, stages: tuple[str, ...]) -> None:
    """Refuse a stage's setting when the run does not train that stage (it would be silently ignored), and warn about
    a budget given for one."""
    run = ",".join(stages)
    ignored = []
    for stage, text, budget in given_stage_flags(args):
        if stage in stages:
            continue
        if budget:
            print(f"warning: {text} is the {stage} stage's, not trained in this run (stages: {run})", file=sys.stderr)
        else:
            ignored.append((stage, text))
    if ignored:
        stage, text = ignored[0]
        more = f" (and {len(ignored) - 1} more)" if len(ignored) > 1 else ""
        suggestion = ",".join(name for name in STAGE_TYPES if name in (*stages, stage))
        raise ValueError(
            f"{text}{more} applies to the {stage} stage, which this run does not train (stages: {run}); "
            f"add the stage with --stages, e.g. --stages {suggestion}"
        )


def _flag_values(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """The fields of ``stage`` its flags set: implied values first, so that a field's own flag wins."""
    implied: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for field in flag_fields(STAGE_TYPES[stage]):
        value = getattr(args, _dest(stage, field.name), None)
        if value is None:
            continue
        convert = field.metadata["to_field"]
        values[field.name] = convert(value) if convert else value
        implied.update(field.metadata["implies"])
    return {**implied, **values}


def parse_set_options(settings: list[str], stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--set STAGE.FIELD=VALUE`` options, each value checked against its field's type: stage -> field -> value."""
    overrides: dict[str, dict[str, Any]] = {}
    for option in settings:
        target, equals, text = option.partition("=")
        stage, dot, name = target.partition(".")
        if not equals or not dot or not stage or not name:
            raise ValueError(f"--set {option}: expected STAGE.FIELD=VALUE, e.g. --set align.max_steps=3")
        if stage not in STAGE_TYPES:
            raise ValueError(f"--set {option}: unknown stage {stage!r}; choose from {','.join(STAGE_TYPES)}")
        if stage not in stages:
            raise ValueError(
                f"--set {option}: the {stage} stage is not trained in this run (stages: {','.join(stages)})"
            )
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        try:
            overrides.setdefault(stage, {})[name] = coerce_setting(STAGE_TYPES[stage], name, value)
        except SettingError as error:
            raise ValueError(f"--set {option}: {error}") from None
    return overrides


def config_from_args(args: argparse.Namespace, stages: tuple[str, ...], recipe: DAFTConfig | None = None) -> DAFTConfig:
    """The run's stages: each from the recipe (or its defaults), then its flags, the flags of every stage
    (``--max-steps``, ``--eval-steps``, ``--kl-patience``, ``--corpus-sample-size``), then ``--set``."""
    overrides = parse_set_options(args.settings, stages)
    built = []
    for name in stages:
        stage_type = STAGE_TYPES[name]
        base = recipe.stage(name) if recipe is not None else None
        values = _flag_values(args, name)
        field_names = {field.name for field in dataclasses.fields(stage_type)}
        shared = {
            "max_steps": args.max_steps,
            "eval_steps": args.eval_steps,
            "kl_patience": None if args.kl_patience is None else (args.kl_patience or None),
            "corpus_sample_size": args.corpus_sample_size,
        }
        given_shared = {"kl_patience"} if args.kl_patience is not None else set()
        for key, value in shared.items():
            if key in field_names and (value is not None or key in given_shared):
                values[key] = value
        values.update(overrides.get(name, {}))
        try:
            stage = dataclasses.replace(base, **values) if base is not None else stage_type(**values)
        except SettingError as error:
            raise ValueError(str(error)) from None
        built.append(stage)
    shared_settings = {
        "seed": args.seed,
        "precision": args.precision,
        "cache_dtype": args.cache_dtype,
        "document_store": args.document_store,
        "cache_on_disk": args.cache_on_disk,
        "device": args.device,
        "query_encoder": args.query_encoder,
        "document_encoder": args.document_encoder,
    }
    if recipe is not None:
        kept = {
            field.name: getattr(recipe, field.name) for field in dataclasses.fields(recipe) if field.name != "stages"
        }
        kept.update({key: value for key, value in shared_settings.items() if value is not None})
        return DAFTConfig(stages=built, **kept)
    return DAFTConfig(stages=built, **{key: value for key, value in shared_settings.items() if value is not None})
