"""Configs build only what may be built: a stored `os.system`, `subprocess.Popen`, `builtins.eval` or
`importlib.import_module` target is refused by every path that reads a config, and never runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import ldm.util as util
from ldm.checkpoint import instantiate_from_checkpoint
from ldm.train import main
from ldm.util import ConfigError, instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
PAYLOADS = ["os.system", "subprocess.Popen", "builtins.eval", "importlib.import_module"]


def payload(target: str, marker: Path) -> dict:
    command = f"touch {marker}"
    params = {"os.system": {"command": command}, "subprocess.Popen": {"args": ["touch", str(marker)]},
              "builtins.eval": {"source": f"__import__('os').system({command!r})"},
              "importlib.import_module": {"name": "antigravity"}}[target]
    return {"target": target, "params": params}


@pytest.mark.parametrize("target", PAYLOADS)
def test_instantiate_refuses_targets_outside_the_allowed_packages(target, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match=rf"model.target: target '{target}' is not allowed: configs build classes"):
        instantiate_from_config(payload(target, marker), key="model")
    assert not marker.exists()


def test_a_refused_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "side_effect_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="side_effect_mod.Thing' is not allowed"):
        instantiate_from_config({"target": "side_effect_mod.Thing"})
    assert not marker.exists() and "side_effect_mod" not in sys.modules


def test_functions_of_allowed_packages_are_refused_unless_registered():
    with pytest.raises(ConfigError, match=r"'torch.nn.functional.relu' is a function, not a class"):
        instantiate_from_config({"target": "torch.nn.functional.relu", "params": {"input": torch.zeros(1)}})
    with pytest.raises(ConfigError, match=r"'ldm.checkpoint.read_checkpoint' is a function, not a class"):
        instantiate_from_config({"target": "ldm.checkpoint.read_checkpoint", "params": {"path": "x.ckpt"}})


def test_user_packages_and_factories_are_allowed_on_purpose(monkeypatch, tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import ldm.util\nclass Net:\n    def __init__(self, width=1): self.width = width\n"
        "@ldm.util.register_factory\ndef make_net(width=2): return Net(width)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(util, "_user_allowed", [])
    monkeypatch.delenv(util.ALLOW_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"main.py --allow-target my_models"):
        instantiate_from_config({"target": "my_models.Net"})
    util.allow_targets(["my_models"])
    assert instantiate_from_config({"target": "my_models.Net", "params": {"width": 3}}).width == 3
    assert instantiate_from_config({"target": "my_models.make_net"}).width == 2  # a registered factory
    monkeypatch.setattr(util, "_user_allowed", [])
    monkeypatch.setenv(util.ALLOW_ENV, "my_models")
    assert instantiate_from_config({"target": "my_models.Net"}).width == 1


@pytest.mark.parametrize("target", PAYLOADS)
def test_main_refuses_a_yaml_naming_a_payload(target, tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(yaml.safe_dump({"model": payload(target, marker),
                                   "data": {"target": "tests.toy.ToyData", "params": {"batch_size": 2}}}))
    with pytest.raises(ConfigError, match=f"target '{target}' is not allowed"):
        main(["--base", str(cfg), "-t", "-l", str(tmp_path / "logs")])
    assert not marker.exists() and not (tmp_path / "logs").exists()


def evil_checkpoint(target: str, tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "config": {"model": payload(target, marker)}}, ckpt)
    return ckpt, marker


@pytest.mark.parametrize("target", PAYLOADS)
def test_a_checkpoint_storing_a_payload_is_refused(target, tmp_path):
    """The config inside a checkpoint cannot name a payload, and cannot widen the allow-list either."""
    ckpt, marker = evil_checkpoint(target, tmp_path)
    with pytest.raises(ConfigError, match=f"target '{target}' is not allowed"):
        instantiate_from_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("script", ["sample.py", "evaluate.py", "benchmark.py", "export_weights.py"])
def test_scripts_refuse_a_checkpoint_storing_a_payload(script, tmp_path):
    ckpt, marker = evil_checkpoint("subprocess.Popen", tmp_path)
    args = [str(ckpt), "--out", str(tmp_path / "out")] if script == "export_weights.py" else ["-r", str(ckpt)]
    run = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    if script == "export_weights.py":  # it builds nothing: weights and config are copied as data
        assert "holds no tensors to export" in run.stderr and "Traceback" not in run.stderr
        assert not marker.exists()
        return
    assert run.returncode != 0 and "is not allowed" in run.stderr, run.stderr[-500:]
    assert not marker.exists()


def test_main_py_ends_a_refused_config_with_one_paragraph_and_status_2(tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(yaml.safe_dump({"model": payload("os.system", marker)}))
    run = subprocess.run([sys.executable, "main.py", "--base", str(cfg), "-t", "-l", str(tmp_path / "logs")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: model.target: target 'os.system' is not allowed" in run.stderr
    assert not marker.exists() and not (tmp_path / "logs").exists()
