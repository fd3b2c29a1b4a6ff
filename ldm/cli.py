"""How the entrypoints end on a user's mistake: one paragraph on stderr and exit status 2, no traceback.

Errors a user can cause are `ConfigError`, `CheckpointError` or `ValueError` with a message that says
what was expected and what was found (CONTRIBUTING.md). `LDM_DEBUG=1` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError)


def run(main: Callable[[], int | None]) -> int:
    """`main()`'s exit status; a user error is printed as `error: <message>` and gives 2."""
    try:
        return int(main() or 0)
    except USER_ERRORS as e:
        if os.environ.get("LDM_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
