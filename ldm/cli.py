"""How the entrypoints treat a user's mistake: checked before any work, and ended with one paragraph on
stderr and exit status 2, no traceback.

Errors a user can cause are `ConfigError`, `CheckpointError` or `ValueError` with a message that says
what was expected and what was found (CONTRIBUTING.md); a `SystemExit` with a message counts too.
`LDM_DEBUG=1` shows the traceback as well. The checks the scripts share (counts, output paths, the
kind of model a checkpoint holds) live here so they read the same everywhere.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, ValueError, FileNotFoundError)
Kind = Literal["prior", "first stage"]


def run(main: Callable[[], int | None]) -> int:
    """`main()`'s exit status; a user error is printed as `error: <message>` and gives 2."""
    try:
        return int(main() or 0)
    except (*USER_ERRORS, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise  # argparse (it has printed its message), --help, sys.exit(n)
        if os.environ.get("LDM_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


def at_least(flag: str, value: int | None, minimum: int = 1) -> None:
    """Refuse a count below `minimum` (None, an option left out, passes)."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def output_path(path: str | os.PathLike, suffixes: Sequence[str], flag: str = "--out") -> Path:
    """`path` if the program can write it at the end: the right extension, not a folder, and a parent
    folder that exists or can be created. Nothing is left behind (a temporary folder probes the nearest
    existing one)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} must end in {' or '.join(suffixes)}, got {path}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name ending in {' or '.join(suffixes)}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path} cannot be written: no write permission in {folder}")
    try:  # permissions do not tell everything (read-only or special file systems, root): try it
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=folder))
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written: {e.strerror or e} in {folder}") from None
    return path


def model_kind(cls: type) -> Kind | None:
    """What a model class is to the scripts: a prior, a first stage (it encodes for priors), or neither."""
    from ldm.prior import LatentPrior

    if isinstance(cls, type) and issubclass(cls, LatentPrior):
        return "prior"
    if hasattr(cls, "encode_for_prior"):
        return "first stage"
    return None


def needs(kind: Kind, script: str) -> Callable[[type], None]:
    """A check for `instantiate_from_checkpoint(..., check_class=...)`: refuse another kind of model by name."""
    def check(cls: type) -> None:
        found = model_kind(cls)
        if found != kind:
            name = f"{cls.__module__}.{cls.__qualname__}"
            what = f"a {found.replace(' ', '-')} checkpoint" if found else "a checkpoint of neither a prior nor a first stage"
            raise CheckpointError(f"this is {what} ({name}); {script} needs a {kind}")

    return check


def compile_prior(prior: Any) -> None:
    """--compile: torch.compile the prior's networks; a prior whose sampler cannot use it is refused by name."""
    try:
        prior.compile_networks()
    except ValueError as e:
        raise ValueError(f"--compile: {e}") from None


def sampler_kwargs(tokens: list[str]) -> dict[str, Any]:
    """`key=value`, `--key=value` and `--key value` tokens to sampler keyword arguments (YAML values)."""
    options: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        item = tokens[i]
        flag = item.startswith("--")
        item = item[2:] if flag else item
        if "=" in item:
            key, value = item.split("=", 1)
        elif flag and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            key, value = item, tokens[i + 1]
            i += 1
        else:
            raise SystemExit(f"sampler options look like key=value or --key value, got {tokens[i]!r}")
        options[key.replace("-", "_")] = yaml.safe_load(value)
        i += 1
    return options
