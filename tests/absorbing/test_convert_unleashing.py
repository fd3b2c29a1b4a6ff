"""scripts/convert_unleashing.py: an original sampler `.th` becomes a project checkpoint whose denoiser
gives the original's logits (the unleashing-transformers fixture)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ldm.checkpoint import instantiate_from_checkpoint, read_checkpoint
from tests.fixture_paths import fixture_dir

REPO = Path(__file__).resolve().parents[2]

# the fixture's sizes: 16 codes, 4x4 tokens, 32 wide, 4 heads, 2 layers, T = 256; a tiny VQ with 16 codes
TINY_CONFIG = {"model": {"base_learning_rate": 1.0e-4, "target": "absorbing.model.AbsorbingPrior", "params": {
    "codebook_size": 16, "num_timesteps": 256, "sample_steps": 4, "use_ema": True,
    "first_stage_config": {"target": "ldm.first_stage.models.VQModel", "params": {
        "n_embed": 16, "embed_dim": 4,
        "ddconfig": {"double_z": False, "z_channels": 4, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "ldm.first_stage.losses.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 100000000, "perceptual_weight": 0.0, "disc_num_layers": 1,
                                  "disc_ndf": 8}}}},
    "denoiser_config": {"target": "absorbing.unleashing.UnleashingTransformer",
                        "params": {"n_embd": 32, "n_head": 4, "n_layer": 2, "dropout": 0.0}}}}}


def convert_script():
    spec = importlib.util.spec_from_file_location("convert_unleashing", REPO / "scripts" / "convert_unleashing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def original_th(tmp_path):
    """The fixture's weights as the original saves a sampler: an OrderedDict in its state_dict() order."""
    root = fixture_dir("unleashing-transformers", "absorbing_transformer")
    layout = json.loads((root / "config.json").read_text())["sampler_state_dict_layout"]
    weights = load_file(str(root / "state_dict.safetensors"))
    g = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for key, shape, _ in layout:
        plain = key.removeprefix("_denoise_fn.")
        state[key] = weights[plain] if key.startswith("_denoise_fn.") else torch.rand(shape, generator=g)
    path = tmp_path / "absorbing_100.th"
    torch.save(state, path)
    return path, state, load_file(str(root / "io.safetensors"))


def test_converted_denoiser_gives_the_original_logits(tmp_path, original_th):
    th, state, io = original_th
    config = tmp_path / "tiny_unleashing.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    out = tmp_path / "converted.ckpt"
    assert convert_script().main([str(th), "--config", str(config), "--out", str(out)]) == 0

    saved = torch.load(out, weights_only=True)  # a plain project checkpoint
    assert saved["config"] == TINY_CONFIG and read_checkpoint(out).keys() == saved.keys()
    prior, _ = instantiate_from_checkpoint(out)
    assert torch.equal(prior.process.Lt_history, state["Lt_history"])
    with torch.no_grad():
        logits = prior.model(io["idx"])  # (2, 16, 16)
        torch.testing.assert_close(logits, io["logits"], atol=1e-5, rtol=1e-4)
        averaged = prior.network("model", ema=True)  # no EMA file given: the copy holds the same weights
        torch.testing.assert_close(averaged(io["idx"]), io["logits"], atol=1e-5, rtol=1e-4)

    run = subprocess.run([sys.executable, "scripts/sample.py", "-r", str(out), "-n", "1", "steps=2",
                          "--out", str(tmp_path / "s.png")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "s.png").exists()


def test_ema_file_fills_the_shadow(tmp_path, original_th):
    th, state, io = original_th
    ema_state = OrderedDict((k, v + 1.0 if k.startswith("_denoise_fn.") else v) for k, v in state.items())
    ema_th = tmp_path / "absorbing_ema_100.th"
    torch.save(ema_state, ema_th)
    script = convert_script()
    prior = script.convert(str(th), TINY_CONFIG, str(ema_th))
    assert torch.equal(prior.model.head.weight, state["_denoise_fn.head.weight"])
    assert torch.equal(prior.network("model", ema=True).head.weight, ema_state["_denoise_fn.head.weight"])


def test_refuses_what_is_not_a_sampler_or_not_the_paper_denoiser(tmp_path, original_th):
    script = convert_script()
    vqgan = tmp_path / "vqgan_100.th"
    torch.save({"ae.encoder.blocks.0.weight": torch.zeros(1)}, vqgan)
    with pytest.raises(SystemExit, match="not an Unleashing Transformers sampler checkpoint"):
        script.main([str(vqgan), "--config", str(_write(tmp_path, TINY_CONFIG)), "--out", str(tmp_path / "x.ckpt")])
    other = json.loads(json.dumps(TINY_CONFIG))
    other["model"]["params"]["denoiser_config"] = {"target": "ldm.nn.transformer.TokenTransformer", "params": {}}
    with pytest.raises(SystemExit, match="UnleashingTransformer"):
        script.main([str(original_th[0]), "--config", str(_write(tmp_path, other)), "--out", str(tmp_path / "x.ckpt")])


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_ckpt_path_in_the_config_reads_the_original_th(original_th):
    """`model.params.ckpt_path=<absorbing_*.th>`: the prior maps the sampler's keys onto its own."""
    th, state, io = original_th
    import copy

    from ldm.util import instantiate_from_config

    config = copy.deepcopy(TINY_CONFIG)
    config["model"]["params"]["ckpt_path"] = str(th)
    prior = instantiate_from_config(config["model"], key="model").eval()
    assert torch.equal(prior.process.Lt_history, state["Lt_history"])
    with torch.no_grad():
        torch.testing.assert_close(prior.model(io["idx"]), io["logits"], atol=1e-5, rtol=1e-4)
        # the .th holds no EMA: the averaged copy starts from the loaded weights, so sampling uses them
        torch.testing.assert_close(prior.network("model", ema=True)(io["idx"]), io["logits"], atol=1e-5, rtol=1e-4)
