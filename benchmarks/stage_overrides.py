"""``st-daft`` with stage settings the CLI does not expose, for experiments: each ``STAGE.FIELD=VALUE`` replaces a
field of that stage's dataclass (VALUE is a Python literal) in the config the CLI builds.

Usage::

    python benchmarks/stage_overrides.py corpus.document_scale=40.0 -- train --corpus CORPUS --output OUT
"""

from __future__ import annotations

import ast
import sys
from dataclasses import replace

import st_daft.cli as cli


def main() -> int:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    separator = sys.argv.index("--")
    overrides = [argument.split("=", 1) for argument in sys.argv[1:separator]]
    build_config = cli._config_from_args

    def with_overrides(args, stages):
        config = build_config(args, stages)
        changed = []
        for stage in config.stages:
            for key, value in overrides:
                name, field = key.split(".", 1)
                if stage.name == name:
                    stage = replace(stage, **{field: ast.literal_eval(value)})
            changed.append(stage)
        config.stages = changed
        print("stages after overrides:", config.stages, flush=True)
        return config

    cli._config_from_args = with_overrides
    return cli.main(sys.argv[separator + 1 :])


if __name__ == "__main__":
    sys.exit(main())
