"""Every script's documented usage lines parse as written, and `--help` works for every script."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ALL = sorted(p.stem for p in SCRIPTS.glob("*.py"))
DOCUMENTED = ["benchmark", "cache_latents", "eval_first_stage", "evaluate", "inpaint", "sample", "schedule_metric"]  # must show their usage
USAGE = re.compile(r"^\s*(?:\S*/)?python\s+scripts/(\w+)\.py\b(.*)$")


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def usage_lines(doc: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of each `python scripts/<x>.py ...` line; `\\` continues a line, `<...>` is a placeholder."""
    text = re.sub(r"\\\n\s*", " ", doc or "")
    found = []
    for line in text.splitlines():
        m = USAGE.match(line)
        if m:
            found.append((m.group(1), shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", m.group(2)), comments=True)))
    return found


class Parsed(Exception):
    pass


def parse(module: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> object:
    """The script's own argument parsing on `argv`, without running the script."""
    if hasattr(module, "parse_args"):
        return module.parse_args(argv)
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args(argv)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    with pytest.raises(Parsed) as e:
        module.main()
    return e.value.args[0]


def test_usage_extraction():
    doc = "x\n    python scripts/a.py -r logs/<prior run>/last.ckpt -n 1 \\\n        --sweep t=1,2   # note\n"
    assert usage_lines(doc) == [("a", ["-r", "logs/PLACEHOLDER/last.ckpt", "-n", "1", "--sweep", "t=1,2"])]


@pytest.mark.parametrize("name", ALL)
def test_documented_usage_parses(name, monkeypatch):
    module = load(name)
    lines = usage_lines(module.__doc__)
    if name in DOCUMENTED:
        assert lines, f"scripts/{name}.py documents no usage line"
    for script, argv in lines:  # a docstring may show the next step with another script
        assert script in ALL, f"scripts/{name}.py documents a script that does not exist: {script}"
        try:
            parse(module if script == name else load(script), argv, monkeypatch)
        except SystemExit as e:
            pytest.fail(f"scripts/{script}.py rejects the usage line {shlex.join(argv)!r} in scripts/{name}.py: "
                        f"exit {e.code}")


@pytest.mark.parametrize("name", ALL)
def test_help_exits_zero(name, monkeypatch, capsys):
    module = load(name)
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / f"{name}.py"), "--help"])
    with pytest.raises(SystemExit) as e:
        module.main()
    assert e.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_sample_options_in_every_documented_form():
    sample = load("sample")
    args = sample.parse_args(["-r", "x.ckpt", "--per-class", "8", "--steps", "32", "--guidance_scale", "2",
                              "temperature=0.9", "--shape=[12,12]", "--order", "raster"])
    assert args.per_class == 8 and args.sampler_kw == {"steps": 32, "guidance_scale": 2, "temperature": 0.9,
                                                       "shape": [12, 12], "order": "raster"}
    with pytest.raises(SystemExit, match="key=value or --key value, got 'oops'"):
        sample.parse_args(["-r", "x.ckpt", "oops"])
    with pytest.raises(SystemExit, match="got '--steps'"):
        sample.parse_args(["-r", "x.ckpt", "--steps"])


@pytest.mark.slow
def test_evaluate_scores_samples_against_the_stored_split(tmp_path):
    from tests.data.test_fmnist import fmnist_available

    if not fmnist_available():
        pytest.skip("Fashion-MNIST is not installed (make data)")
    import glob
    import json

    from ldm.train import main as train

    config = Path(__file__).resolve().parents[1] / "configs" / "test" / "absorbing.yaml"
    train(["--base", str(config), "-t", "--no-test", "-l", str(tmp_path), "-n", "absorbing"])
    ckpt = glob.glob(str(tmp_path / "*_absorbing" / "checkpoints" / "last.ckpt"))[0]
    out = tmp_path / "eval.json"
    # the tiny config has no test split; its validation images are 16x16, which the classifier resizes
    assert load("evaluate").main(["-r", ckpt, "-n", "4", "--batch-size", "4", "--eval-split", "validation",
                                  "--sweep", "steps=2", "--bf16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["reference_images"] == "data.params.validation" and result["bf16"]
    assert {"FD_fmnist", "conditional_accuracy", "precision"} <= set(result["first_stage_reconstructions"])
    assert len(result["rows"]) == 1 and result["rows"][0]["steps"] == 2 and result["rows"][0]["FD_fmnist"] >= 0
    with pytest.raises(SystemExit, match="no data.params.test; choose a split it has"):
        load("evaluate").main(["-r", ckpt, "-n", "4", "--out", str(tmp_path / "e2.json")])
