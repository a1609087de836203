"""The objectives, one file each: `models/objectives/<name>.py` holds objective `<name>`.

This folder is the list (timm's registry, with the module as the entry): a new objective is
a new file here and nothing else. Listing the names reads the folder only, so the config,
`--help-config` and their errors know them without importing torch; `objective_class(name)`
(models/objective.py) imports the one file it is asked for.
"""

from __future__ import annotations

import pkgutil
from functools import lru_cache
from pathlib import Path

PACKAGE = __name__


@lru_cache(maxsize=1)
def builtin_objective_names() -> tuple[str, ...]:
    """The names of the objectives in this folder (its modules not starting with '_'), sorted."""
    return tuple(
        sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))
    )
