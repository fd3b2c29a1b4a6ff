"""A missing reference fixture skips its test on a developer's machine and fails it under CI."""

from __future__ import annotations

import pytest

from tests import fixture_paths
from tests.fixture_paths import fixture_dir


def outcome_of(*parts: str) -> BaseException | None:
    """The skip or failure `fixture_dir` raises, caught here so that a wrong one fails this test."""
    try:
        fixture_dir(*parts)
    except (pytest.fail.Exception, pytest.skip.Exception) as e:
        return e
    return None


@pytest.fixture
def fixtures_root(tmp_path, monkeypatch):
    root = tmp_path / "fixtures"
    (root / "orig" / "present").mkdir(parents=True)
    monkeypatch.setattr(fixture_paths, "FIXTURES", root)
    return root


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_missing_fixture_fails_under_ci_and_says_where_it_looked(fixtures_root, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    e = outcome_of("orig", "absent")
    assert isinstance(e, pytest.fail.Exception), repr(e)
    assert f"reference fixtures not found at {fixtures_root / 'orig' / 'absent'}" in str(e)
    assert "CI" in str(e)


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_fixture_skips_outside_ci(fixtures_root, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    e = outcome_of("orig", "absent")
    assert isinstance(e, pytest.skip.Exception), repr(e)
    assert f"reference fixtures not found at {fixtures_root / 'orig' / 'absent'}" in str(e)


@pytest.mark.parametrize("ci", [None, "true"])
def test_present_fixture_is_returned(fixtures_root, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert fixture_dir("orig", "present") == fixtures_root / "orig" / "present"


def test_ci_failure_reaches_the_pytest_report(pytester, monkeypatch, tmp_path):
    """End to end: a test asking for a missing fixture is reported failed, not skipped, when CI=true."""
    monkeypatch.setattr(fixture_paths, "FIXTURES", tmp_path / "nowhere")
    pytester.makepyfile(test_uses_fixture="""
        from tests.fixture_paths import fixture_dir

        def test_needs_fixture():
            fixture_dir("latent-diffusion", "autoencoder_kl")
    """)
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*reference fixtures not found at {tmp_path / 'nowhere'}/latent-diffusion*"])
    monkeypatch.delenv("CI")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(skipped=1)
