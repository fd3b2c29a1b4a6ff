"""Tiny prior checkpoints for the app tests, built on first use from each prior's tiny config (as main.py
writes them: weights and resolved config; `tests.test_script_checks.save_checkpoint`), never committed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.test_script_checks import save_checkpoint

# each prior the apps serve, by the name the tests use: its tiny config, or a cascade's sampling config
PRIORS = {"absorbing": "absorbing.yaml", "sundae": "sundae.yaml", "imagebart": "imagebart.yaml", "ldm": "ldm.yaml",
          "ldm_text": "ldm_text.yaml", "ldm_pixel": "ldm_pixel.yaml", "ldm_edm": "ldm_edm.yaml", "cascade": None}
SIZES = {"ldm": 32, "ldm_text": 32, "ldm_edm": 32, "cascade": 32}  # image side where not 16


def cascade(root: Path) -> str:
    """A sampling config that stacks the tiny pixel-space base and super-resolution stage (16 -> 32)."""
    base = save_checkpoint("ldm_pixel.yaml", root / "cascade_base.ckpt")
    sr = save_checkpoint("ldm_sr.yaml", root / "cascade_sr.ckpt")
    path = root / "cascade.yaml"
    path.write_text(yaml.safe_dump({"model": {"target": "ldm.diffusion.cascade.CascadePrior", "params": {"stages": [
        {"checkpoint": base, "sample": {"steps": 2}}, {"checkpoint": sr, "sample": {"steps": 2}}]}}}))
    return str(path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[[str], str]:
    """`checkpoint(name)`: the path of a tiny checkpoint of that prior (a name of PRIORS, `ldm_sr` or
    `first_stage`), written once per test session."""
    root = tmp_path_factory.mktemp("app_checkpoints")
    made: dict[str, str] = {}
    configs = {**PRIORS, "ldm_sr": "ldm_sr.yaml", "first_stage": "first_stage_vq.yaml"}

    def get(name: str) -> str:
        if name not in made:
            if name == "cascade":
                made[name] = cascade(root)
            else:
                made[name] = save_checkpoint(configs[name], root / f"{name}.ckpt")
        return made[name]

    return get
