"""Optional dependencies: import one, or fail with the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``; if it is missing, raise an ImportError naming ``feature`` and ``pip install tint_hf[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{feature} needs the `{module.split('.')[0]}` package: pip install 'tint_hf[{extra}]'."
                          ) from error
