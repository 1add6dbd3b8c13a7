"""Bad input as one clear line: the errors a user can fix (config, data, weights, a diverged run) and the
hook every entry script installs so they print as ``lowshot: error: ...`` instead of a traceback."""

from __future__ import annotations

import sys
from types import TracebackType

from .config import ConfigError
from .data import DataError
from .guard import DivergenceError
from .models import WeightsError

USER_ERRORS = (ConfigError, DataError, WeightsError, DivergenceError)


def user_errors() -> None:
    """Show bad input (config, data, weights) as one clear line instead of a traceback."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, USER_ERRORS):
            print(f"lowshot: error: {err}", file=sys.stderr)
        else:
            previous(kind, err, tb)

    sys.excepthook = hook
