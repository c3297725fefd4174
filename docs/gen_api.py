"""Generate the API reference pages (mkdocs-gen-files): one page per module of the st_daft package.

Every public module under st_daft/ gets a page ``reference/<dotted name>.md`` holding ``::: <dotted name>``, and
the navigation (``reference/SUMMARY.md``, read by mkdocs-literate-nav) lists them in the order below. A new module
appears by itself; this file is the one place to change what the reference shows:

- ``FIRST``: modules listed first, in this order (the rest follow alphabetically);
- ``EXCLUDE``: modules left out (private modules, ``_*.py``, are always left out);
- ``PACKAGE_OPTIONS``: a package's page shows its docstring only, not every re-exported name again.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

PACKAGE = "st_daft"
FIRST = ["st_daft.models.asymmetric", "st_daft.training.recipe", "st_daft.losses", "st_daft.evaluation.collapse"]
EXCLUDE: set[str] = {"st_daft.cli"}  # the CLI is documented by `st-daft --help` and the guide
PACKAGE_OPTIONS = "    options:\n      members: false\n"

root = Path(__file__).resolve().parents[1]
modules = []
packages = set()
for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        packages.add(".".join(parts))
    elif parts[-1].startswith("_"):
        continue
    name = ".".join(parts)
    if not any(name == excluded or name.startswith(excluded + ".") for excluded in EXCLUDE):
        modules.append(name)
order = [name for name in FIRST if name in modules] + sorted(name for name in modules if name not in FIRST)
order.remove(PACKAGE)
order.insert(0, PACKAGE)

nav = mkdocs_gen_files.Nav()
for name in order:
    page = f"reference/{name}.md"
    with mkdocs_gen_files.open(page, "w") as handle:
        handle.write(f"# `{name}`\n\n::: {name}\n")
        if name in packages:
            handle.write(PACKAGE_OPTIONS)
    nav[name] = f"{name}.md"

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as handle:
    handle.writelines(nav.build_literate_nav())
