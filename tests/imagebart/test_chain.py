"""A sampling config stacks one checkpoint per scale (the original's way): sample.py takes it as it takes a
checkpoint, each scale runs its checkpoint's averaged network, and a config mixing scales, priors or first
stages is refused in one sentence before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ldm.checkpoint import instantiate_from_checkpoint
from tests.test_script_checks import refused, save_checkpoint


def chain_config(tmp_path: Path, checkpoints: list[str], name: str = "chain.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": {"target": "imagebart.model.ImageBARTPrior",
                                              "params": {"checkpoints": checkpoints}}}))
    return str(path)


@pytest.fixture(scope="module")
def scales(tmp_path_factory):
    root = tmp_path_factory.mktemp("scales")
    return [save_checkpoint("imagebart.yaml", root / f"scale{t}.ckpt", **{"model.params.single_scale": t})
            for t in (1, 2)]


def test_chain_samples_with_each_scales_averaged_network(scales, tmp_path):
    chain, config = instantiate_from_checkpoint(chain_config(tmp_path, scales))
    assert chain.network_names == ("scale1", "scale2") and config["model"]["params"]["single_scale"] == 1
    one, _ = instantiate_from_checkpoint(scales[0])
    two, _ = instantiate_from_checkpoint(scales[1])
    assert chain.transition(1) is not None and torch.equal(
        next(chain.transition(1).parameters()), next(one.network("model", ema=True).parameters()))
    assert torch.equal(next(chain.transition(2).parameters()), next(two.network("top", ema=True).parameters()))
    images = chain.sample(2, cond=[3, 4], generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1


def test_sample_script_takes_a_chain(scales, tmp_path):
    from ldm.cli import run
    from tests.test_scripts import load

    out = tmp_path / "grid.png"
    assert run(lambda: load("sample").main(["-r", chain_config(tmp_path, scales), "-n", "2", "--out", str(out)])) == 0
    assert out.exists()


def test_bad_chains_are_refused(scales, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = lambda cfg: ["-r", cfg, "-n", "1", "--out", str(out / "g.png")]  # noqa: E731
    message = refused("sample", argv(chain_config(tmp_path, [scales[1], scales[0]], "swapped.yaml")), out, capsys)
    assert message.endswith("checkpoint 1 (" + scales[1] + ") was trained for scale 2, not scale 1")
    sundae = save_checkpoint("sundae.yaml", tmp_path / "sundae.ckpt")
    message = refused("sample", argv(chain_config(tmp_path, [scales[0], sundae], "mixed.yaml")), out, capsys)
    assert message.endswith("a checkpoint is of SundaePrior, not an ImageBART scale")
    other = save_checkpoint("imagebart.yaml", tmp_path / "other.ckpt", **{
        "model.params.single_scale": 2, "model.params.first_stage_config.params.embed_dim": 8,
        "model.params.first_stage_config.params.ddconfig.z_channels": 8})
    message = refused("sample", argv(chain_config(tmp_path, [scales[0], other], "stages.yaml")), out, capsys)
    assert "the scale checkpoints disagree on first_stage_config: scale 1" in message
    message = refused("sample", argv(chain_config(tmp_path, [scales[0]], "short.yaml")), out, capsys)
    assert message.endswith("the scale checkpoints are of a 2-scale chain; list 2, got 1")
