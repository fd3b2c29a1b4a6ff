"""The SUNDAE prior end to end: training through main.py (the test split's unrolled loss), the original's
checkpoints, the sampler options, and the errors bad input gets."""

from __future__ import annotations

import copy
import csv
import glob
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.checkpoint import CheckpointError, export_safetensors, instantiate_from_checkpoint
from ldm.cli import run
from ldm.train import main
from ldm.util import ConfigError, instantiate_from_config
from tests.data.test_fmnist import needs_data
from tests.fixture_paths import fixture_dir
from tests.test_script_checks import refused, save_checkpoint
from tests.test_scripts import load
from tests.toy import build_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "test"
CFG = CONFIGS / "sundae.yaml"


def build(**overrides):
    return build_from_config(CFG, **overrides)


@needs_data
def test_train_with_main_logs_the_unrolled_loss_on_the_test_split(tmp_path):
    """main.py trains a few steps, then tests: SUNDAE has no likelihood, so the test split reports its
    unrolled denoising loss, per unrolled step and with the token accuracy."""
    test_split = "{target: ldm.data.fmnist.FashionMNIST, params: {split: test, size: 16, resize_mode: resize, limit: 16}}"
    main(["--base", str(CFG), "-t", "-l", str(tmp_path), "-n", "sundae", f"data.params.test={test_split}"])
    run_dir = Path(glob.glob(str(tmp_path / "*_sundae"))[0])
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 4 and all(r["train/loss_step1"] and r["train/loss_step2"] and r["train/accuracy"] for r in train)
    test = [r for r in rows if r.get("test/loss")]
    assert len(test) == 1 and float(test[0]["test/loss"]) > 0
    assert float(test[0]["test/loss"]) == pytest.approx(float(test[0]["test/loss_step1"]) + float(test[0]["test/loss_step2"]),
                                                       rel=1e-4)
    assert 0 <= float(test[0]["test/accuracy"]) <= 1
    model, _ = instantiate_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    images = model.sample(2, cond=3, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16)


def test_nll_says_sundae_has_no_likelihood():
    model = build().eval()
    assert not model.has_likelihood
    batch = {"image": torch.zeros(1, 1, 16, 16), "class_label": torch.tensor([1])}
    with pytest.raises(NotImplementedError, match="SundaePrior has no likelihood: SUNDAE defines no tractable "
                                                  "likelihood; its unrolled denoising loss .* is logged as test/loss"):
        model.nll(batch)


def test_sampling_stops_early_and_records_its_steps():
    model = build().eval()
    with torch.no_grad():  # a network certain that every token is right: nothing changes
        model.model.to_logits.weight.zero_()
        model.model.to_logits.bias.copy_(torch.arange(16.0) * 100)  # code 15 everywhere, always
    seen = []
    model.sample(2, cond=[1, 2], steps=30, min_steps=3, proportion=1.0, use_ema=False,
                 generator=torch.Generator().manual_seed(0), callback=lambda d: seen.append(d["steps_taken"].tolist()))
    # step 0 sets every token to 15, steps 1-2 run as min_steps asks, step 3 finds nothing changed: stop
    assert seen[-1] == [4, 4] and len(seen) == 4
    latents = model.sample_latents(2, model.user_cond([1, 2], 2), torch.Generator().manual_seed(0), ema=False,
                                   steps=30, min_steps=3, proportion=1.0)
    assert (latents == 15).all()


def test_inpainting_holds_the_known_tokens_and_checks_the_mask():
    model = build().eval()
    latents = torch.randint(0, 16, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    known = torch.zeros(2, 8, 8, dtype=torch.bool)
    known[:, :3] = True
    out = model.inpaint_latents(latents, known, model.user_cond([1, 2], 2), torch.Generator().manual_seed(1),
                                steps=6, proportion=1.0, min_steps=None)
    assert torch.equal(out[known], latents[known]) and not torch.equal(out[~known], latents[~known])
    with pytest.raises(ValueError, match=re.escape("known mask (2, 8, 4) does not match the token map (2, 8, 8)")):
        model.inpaint_latents(latents, known[..., :4], {}, None)
    with pytest.raises(ValueError, match=re.escape("mask must have shape (B, 1, H, W) = (2, 1, 16, 16)")):
        model.inpaint(torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 8, 8))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="^model.params.codebook_size: the first stage has a codebook of 16 codes "
                                          "but the prior is configured for 32; they must be equal$"):
        build(**{"model.params.codebook_size": 32})
    with pytest.raises(ConfigError, match=re.escape("model.params.network_config.params.shorten_factor: the 8x8 token "
                                                    "map (64 tokens) at level 1 does not divide into 3x3 patches")):
        build(**{"model.params.network_config.params.shorten_factor": 9})
    with pytest.raises(ConfigError, match=re.escape("model.params.sample_defaults: proportion must be a number in "
                                                    "(0, 1], got 0")):
        build(**{"model.params.sample_defaults.proportion": 0})
    model = build().eval()
    with pytest.raises(ValueError, match=r"cond must be a class label or one per sample, in 0..9"):
        model.sample(2, cond=[1, 12])
    batch = {"tokens": torch.zeros(2, 8, 8, dtype=torch.long), "class_label": torch.tensor([3, 11])}
    with pytest.raises(ValueError, match=re.escape("class labels must be in 0..9 (or 10, the null class; num_classes=10), "
                                                   "got [3, 11]")):
        model.compute_loss(model.get_latents(batch), model.get_cond(batch))
    for option, message in (("steps=0", "steps must be an integer >= 1, got 0"),
                            ("min_steps=-1", "min_steps must be an integer >= 0 or None, got -1"),
                            ("end_proportion=1.5", "end_proportion must be a number in (0, 1] or None, got 1.5"),
                            ("temperature=-1", "temperature must be a number >= 0, got -1")):
        key, value = option.split("=")
        with pytest.raises(ValueError, match=re.escape(message)):
            model.sample(1, **{key: float(value) if "." in value else int(value)})


@pytest.mark.parametrize("override, message", [
    ("model.params.network_config.params.shorten_factor=9",
     "model.params.network_config.params.shorten_factor: the 8x8 token map (64 tokens) at level 1 does not divide"),
    ("model.params.codebook_size=32", "model.params.codebook_size: the first stage has a codebook of 16 codes"),
    ("model.params.network_config.params.depth=[1,2]", "model.params.network_config.params.depth: a list has 1 or 3"),
])
def test_main_refuses_a_bad_setting_before_writing_anything(tmp_path, override, message):
    with pytest.raises(ValueError) as e:
        main(["--base", str(CFG), "-t", "-l", str(tmp_path / "logs"), override])
    assert str(e.value).startswith(message)
    assert not (tmp_path / "logs").exists()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"sundae": save_checkpoint("sundae.yaml", root / "sundae.ckpt"),
            "absorbing": save_checkpoint("absorbing.yaml", root / "absorbing.ckpt")}


def test_another_priors_checkpoint_is_refused(ckpts, tmp_path, capsys):
    """sample.py -r with another prior's checkpoint and a SUNDAE config, exported weights of another prior,
    and ckpt_path: one sentence each, nothing written."""
    out = ["--out", str(tmp_path / "g.png")]
    assert refused("sample", ["-r", ckpts["absorbing"], "--config", str(CFG), *out], tmp_path, capsys) == \
        f"{ckpts['absorbing']} is a checkpoint of absorbing.model.AbsorbingPrior, but the config given builds " \
        "sundae.model.SundaePrior; give the config it was trained with (or none: the checkpoint carries its own)"
    weights = tmp_path / "w" / "absorbing.safetensors"
    weights.parent.mkdir()
    export_safetensors(torch.load(ckpts["absorbing"], weights_only=True)["state_dict"], weights)
    msg = refused("sample", ["-r", str(weights), "--config", str(CFG), *out], tmp_path, capsys)
    assert msg.startswith(f"{weights} holds another network than SundaePrior's 'model'") and "another prior" in msg
    with pytest.raises(CheckpointError, match=r"ckpt_path .*absorbing.ckpt holds another network than SundaePrior's"):
        build(**{"model.params.ckpt_path": ckpts["absorbing"]})


def test_scripts_take_the_prior(ckpts, tmp_path, capsys):
    """sample.py (options listed and checked), benchmark.py (steps run, and the hourglass cost table) and
    evaluate.py (which refuses an ELBO before any work)."""
    assert run(lambda: load("sample").main(["-r", ckpts["sundae"], "--list-options"])) == 0
    listed = capsys.readouterr().out
    assert "steps: an integer >= 1; default 4" in listed and "end_temperature: a number >= 0 or None; default 0.8" in listed
    assert "min_steps: an integer >= 0 or None; default 2" in listed
    assert refused("sample", ["-r", ckpts["sundae"], "proportion=0", "--out", str(tmp_path / "g.png")], tmp_path,
                   capsys) == "proportion must be a number in (0, 1], got 0"
    assert run(lambda: load("sample").main(["-r", ckpts["sundae"], "--per-class", "1", "steps=2", "guidance_scale=2",
                                            "--out", str(tmp_path / "g.png")])) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    capsys.readouterr()
    assert run(lambda: load("benchmark").main(["-r", ckpts["sundae"], "--batch", "2", "--steps", "3",
                                               "--repeats", "2", "--guidance", "2", "--option", "min_steps=null"])) == 0
    out = capsys.readouterr().out
    bench = json.loads(out[out.index("{"):])
    assert bench["steps"] == 3 and bench["steps_run"] == 3 and bench["step_s"] > 0
    assert bench["options"]["min_steps"] is None
    low, high = bench["step_over_forward_quartiles"]
    assert low <= bench["step_over_forward"] <= high
    assert run(lambda: load("benchmark").main(["-r", ckpts["sundae"], "--cost-lengths", "16,64", "--batch", "2",
                                               "--repeats", "1"])) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("{"):])["rows"]
    assert [r["length"] for r in rows] == [16, 64]
    for r in rows:
        assert r["hourglass_s"] > 0 and r["plain_s"] > 0 and r["time_ratio"] == pytest.approx(r["hourglass_s"] / r["plain_s"])
        assert 0 < r["activation_ratio"] < 1.5
    assert refused("benchmark", ["-r", ckpts["sundae"], "--cost-lengths", "64,25"], tmp_path, capsys) == \
        "--cost-lengths 25: shorten_factor: the 5x5 token map (25 tokens) at level 1 does not divide into 2x2 " \
        "patches (shorten factor 4): the sequence length must be divisible by the shorten factors"
    assert refused("benchmark", ["-r", ckpts["absorbing"], "--cost-lengths", "64"], tmp_path, capsys) == \
        "--cost-lengths needs a prior with an hourglass network; AbsorbingPrior's is TokenTransformer"
    assert refused("evaluate", ["-r", ckpts["sundae"], "-n", "0", "--elbo-limit", "2", "--elbo-split", "validation",
                                "--out", str(tmp_path / "e.json")], tmp_path, capsys).startswith(
        "--elbo-limit: SundaePrior has no likelihood (SUNDAE defines no tractable likelihood")


def test_original_checkpoint_loads_through_ckpt_path(tmp_path):
    """A sundae-vqgan training checkpoint (ptpt's {"net": state dict, ...}) as the prior's ckpt_path: the prior's
    network then gives the original's logits; a network not built as the original's is refused."""
    root = fixture_dir("sundae-vqgan", "hourglass_lm")
    state, io = load_file(str(root / "state_dict.safetensors")), load_file(str(root / "io.safetensors"))
    path = tmp_path / "checkpoint.pt"
    torch.save({"net": state, "opt": {"lr": torch.tensor(3e-5)}, "nb_updates": 100}, path)
    cfg = OmegaConf.to_container(OmegaConf.load(CFG), resolve=True)
    params = cfg["model"]["params"]
    params["first_stage_config"]["params"]["ddconfig"]["resolution"] = 8  # 4x4 tokens, the fixture's 16
    params["network_config"]["params"] = {"dim": 32, "depth": [2, 2, 2], "shorten_factor": 4, "heads": 4,
                                          "dim_head": 64, "rotary_mode": "original", "resample_groups": "raster"}
    params["ckpt_path"] = str(path)
    prior = instantiate_from_config(cfg["model"], key="model").eval()
    with torch.no_grad():
        for ema in (False, True):  # no EMA in the file: the averaged copy starts from its weights
            logits = prior.denoiser(ema)(io["x"], {"class_label": io["c"]})
            torch.testing.assert_close(logits, io["logits_cond"], atol=1e-5, rtol=1e-5)
    corrected = copy.deepcopy(cfg)
    corrected["model"]["params"]["network_config"]["params"]["rotary_mode"] = "per_head"
    with pytest.raises(ValueError, match="an original sundae-vqgan checkpoint needs the network it was trained with"):
        instantiate_from_config(corrected["model"], key="model")


def test_declared_defaults_are_the_sampler_defaults():
    """Without a config's sample_defaults, the prior samples with the sampler function's own defaults."""
    import inspect

    from sundae.model import SAMPLER_DEFAULTS, SundaePrior
    from sundae.sampling import sample

    signature = inspect.signature(sample).parameters
    assert [o.name for o in SundaePrior.sampler_options] == list(SAMPLER_DEFAULTS)
    for name, value in SAMPLER_DEFAULTS.items():
        if name != "steps":  # the function takes steps as an argument
            assert signature[name].default == value, name
    assert build().sample_defaults == {**SAMPLER_DEFAULTS, "steps": 4, "end_temperature": 0.8, "proportion": 0.8,
                                       "end_proportion": 0.5, "min_steps": 2}
