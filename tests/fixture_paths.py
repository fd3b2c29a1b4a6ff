"""Where the reference fixtures of the original implementations live (next to the repository).

A missing fixture skips its tests on a developer's machine, but fails them under CI (`CI` set to
true, as GitHub Actions, GitLab and most CI services do), so a CI job that lost its fixtures cannot
pass while silently testing nothing against the originals.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def fixture_dir(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        if running_in_ci():
            pytest.fail(f"reference fixtures not found at {path} (CI is set, so a missing fixture fails "
                        f"instead of skipping; fixtures are looked for under {FIXTURES})", pytrace=False)
        pytest.skip(f"reference fixtures not found at {path}")
    return path
