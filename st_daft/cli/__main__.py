"""``python -m st_daft.cli``: runs the ``st-daft`` command, as the console script does."""

import sys

from st_daft.cli import main

sys.exit(main())
