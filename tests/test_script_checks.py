"""The scripts refuse bad arguments before any work, through `ldm.cli.run` (one `error:` line, status 2),
and write nothing; the same scripts still run on valid arguments. Checkpoints are tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import output_path, run
from ldm.util import instantiate_from_config
from tests.test_scripts import load

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "test"
TOY_SPLIT = {"target": "tests.toy.ToyImages", "params": {"n": 4, "size": 16}}  # no data set needed


def save_checkpoint(config_name: str, path: Path, **overrides) -> str:
    """A checkpoint as main.py writes one (weights and resolved config), of a randomly initialised model."""
    cfg = OmegaConf.load(CONFIGS / config_name)
    OmegaConf.update(cfg, "data.params.validation", TOY_SPLIT, merge=False)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = instantiate_from_config(config["model"], key="model")
    torch.save({"state_dict": model.state_dict(), "config": config}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"prior": save_checkpoint("absorbing.yaml", root / "prior.ckpt"),
            "unconditional": save_checkpoint("absorbing.yaml", root / "unconditional.ckpt",
                                             **{"model.params.num_classes": None}),
            "first_stage": save_checkpoint("first_stage_vq.yaml", root / "vq.ckpt")}


def refused(script: str, argv: list[str], out_dir: Path, capsys) -> str:
    """The script's error message; it must exit 2 through run() and leave `out_dir` empty."""
    capsys.readouterr()
    before = sorted(out_dir.rglob("*"))
    assert run(lambda: load(script).main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(out_dir.rglob("*")) == before, "a refused run wrote something"
    return err[len("error: "):].rstrip("\n")


# --- sample.py ----------------------------------------------------------------------------------------
SAMPLE_BAD = [
    (["-n", "0"], "-n must be >= 1, got 0"),
    (["--per-class", "0"], "--per-class must be >= 1, got 0"),
    (["steps=0"], "steps must be an integer in 1..16 or None, got 0"),
    (["--temperature", "-1"], "temperature must be a number >= 0, got -1"),
    (["guidance_scale=-2"], "guidance_scale must be a number >= 0, got -2"),
    (["top_p=0"], "top_p must be a number in (0, 1] or None, got 0"),
    (["--order=spiral"], "order must be one of random, confidence, raster, got 'spiral'"),
    (["stpes=4"], "AbsorbingPrior.sample has no option 'stpes' (did you mean 'steps'?); valid options: order, schedule, "
                  "confidence_noise, shape, steps, temperature, top_k, top_p, guidance_scale, stride"),
    (["--cond", "12"], "--cond must be a class label in 0..9 (or 10, the null class), got 12"),
    (["--cond", "a photo of a bag"], "cond must be a class label or one per sample, in 0..9, got 'a photo of a bag'"),
]


@pytest.mark.parametrize("argv,message", SAMPLE_BAD, ids=[" ".join(a) for a, _ in SAMPLE_BAD])
def test_sample_refuses(argv, message, ckpts, tmp_path, capsys):
    msg = refused("sample", ["-r", ckpts["prior"], "--out", str(tmp_path / "grid.png"), *argv], tmp_path, capsys)
    assert msg == message


def test_sample_refuses_an_output_it_could_not_write(ckpts, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.png").mkdir()
    args = ["-r", ckpts["prior"], "-n", "1", "steps=1", "--out"]
    assert refused("sample", [*args, str(tmp_path / "grid.txt")], tmp_path, capsys) == \
        f"--out must end in .png or .jpg or .jpeg, got {tmp_path / 'grid.txt'}"
    assert refused("sample", [*args, str(tmp_path / "grid")], tmp_path, capsys) == \
        f"--out must end in .png or .jpg or .jpeg, got {tmp_path / 'grid'}"
    assert refused("sample", [*args, str(tmp_path / "folder.png")], tmp_path, capsys) == \
        f"--out {tmp_path / 'folder.png'} is a folder; give a file name ending in .png or .jpg or .jpeg"
    assert refused("sample", [*args, str(tmp_path / "file" / "sub" / "grid.png")], tmp_path, capsys) == \
        f"--out {tmp_path / 'file' / 'sub' / 'grid.png'} cannot be written: {tmp_path / 'file'} is a file, not a folder"


def test_sample_refuses_a_checkpoint_of_another_kind(ckpts, tmp_path, capsys):
    assert refused("sample", ["-r", ckpts["first_stage"], "--out", str(tmp_path / "g.png")], tmp_path, capsys) == \
        "this is a first-stage checkpoint (ldm.first_stage.models.VQModel); sample.py needs a prior"
    assert refused("sample", ["-r", ckpts["unconditional"], "--per-class", "2", "--out", str(tmp_path / "g.png")],
                   tmp_path, capsys) == "--per-class needs a class-conditional prior"
    assert refused("sample", ["-r", ckpts["unconditional"], "--cond", "1", "--out", str(tmp_path / "g.png")],
                   tmp_path, capsys) == "--cond with a class label needs a class-conditional prior"
    assert refused("sample", ["-r", ckpts["unconditional"], "guidance_scale=2", "--out", str(tmp_path / "g.png")],
                   tmp_path, capsys) == "guidance_scale must be 1 for an unconditional prior, got 2"


def test_sample_writes_a_grid_and_lists_its_options(ckpts, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "grid.png"  # missing folders are created, after sampling
    assert run(lambda: load("sample").main(["-r", ckpts["prior"], "--per-class", "1", "steps=2", "temperature=0.5",
                                             "--shape", "[8, 10]", "--out", str(out)])) == 0
    assert out.stat().st_size > 0
    capsys.readouterr()
    assert run(lambda: load("sample").main(["-r", ckpts["prior"], "--list-options"])) == 0
    listed = capsys.readouterr().out
    assert "steps: an integer in 1..16 or None; default 4" in listed
    assert "guidance_scale: a number >= 0; default 1" in listed


# --- evaluate.py --------------------------------------------------------------------------------------
EVALUATE_BAD = [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["-n", "-1"], "-n must be >= 0, got -1"),
    (["-n", "0"], "nothing to evaluate: -n 0 skips the samples and --elbo-limit 0 the ELBO"),
    (["-n", "0", "--elbo-limit", "2", "--sweep", "steps=2"], "--sweep needs samples, but -n is 0"),
    (["-n", "0", "--elbo-limit", "2", "--elbo-strata", "0"], "--elbo-strata must be >= 1, got 0"),
    (["--elbo-strata", "2"], "--elbo-strata needs --elbo-limit >= 1 (without it the ELBO is skipped)"),
    (["--test-limit", "0"], "--test-limit must be >= 1, got 0"),
    (["--sweep", "steps=0"], "steps must be an integer in 1..16 or None, got 0"),
    (["--sweep", "steps=4,0", "temperature=1"], "steps must be an integer in 1..16 or None, got 0"),
    (["--sweep", "temperature=1,-1"], "temperature must be a number >= 0, got -1"),
    (["--sweep", "guidance_scale=-1"], "guidance_scale must be a number >= 0, got -1"),
    (["--sweep", "steps="], "--sweep entries look like name=v1,v2 (a list in brackets is one value); got 'steps='"),
    (["-n", "0", "--elbo-limit", "2", "--elbo-split", "test"],
     "--elbo-split: the stored config has no data.params.test; choose a split it has (train, validation)"),
]


@pytest.mark.parametrize("argv,message", EVALUATE_BAD, ids=[" ".join(a) for a, _ in EVALUATE_BAD])
def test_evaluate_refuses(argv, message, ckpts, tmp_path, capsys):
    msg = refused("evaluate", ["-r", ckpts["prior"], "--out", str(tmp_path / "eval.json"), *argv], tmp_path, capsys)
    assert msg == message


def test_evaluate_refuses_a_first_stage_and_a_folder(ckpts, tmp_path, capsys):
    assert refused("evaluate", ["-r", ckpts["first_stage"], "--out", str(tmp_path / "e.json")], tmp_path, capsys) == \
        "this is a first-stage checkpoint (ldm.first_stage.models.VQModel); evaluate.py needs a prior"
    (tmp_path / "e.json").mkdir()
    assert refused("evaluate", ["-r", ckpts["prior"], "--out", str(tmp_path / "e.json")], tmp_path, capsys) == \
        f"--out {tmp_path / 'e.json'} is a folder; give a file name ending in .json"


def test_evaluate_scores_the_elbo(ckpts, tmp_path):
    out = tmp_path / "sub" / "eval"  # gets its .json suffix; the folder is created
    assert run(lambda: load("evaluate").main(["-r", ckpts["prior"], "-n", "0", "--elbo-limit", "2", "--elbo-strata", "2",
                                              "--elbo-split", "validation", "--out", str(out)])) == 0
    result = json.loads((tmp_path / "sub" / "eval.json").read_text())
    assert result["elbo_items"] == 2 and result["elbo_strata"] == 2 and result["elbo_bits_per_dim"] > 0


def test_evaluate_reports_the_steps_early_stopping_samples_take(tmp_path):
    """SUNDAE's samples stop on their own: each row gives the mean and largest number of network calls."""
    ckpt = save_checkpoint("sundae.yaml", tmp_path / "sundae.ckpt", **{"data.params.test": TOY_SPLIT})
    out = tmp_path / "eval.json"
    argv = ["-r", ckpt, "-n", "10", "--batch-size", "5", "--sweep", "steps=4", "min_steps=1", "--out", str(out)]
    assert run(lambda: load("evaluate").main(argv)) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert 1 <= row["steps_mean"] <= row["steps_max"] <= 4 and isinstance(row["steps_max"], int)


# --- benchmark.py -------------------------------------------------------------------------------------
BENCHMARK_BAD = [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--steps", "17"], "--steps: steps must be an integer in 1..16 or None, got 17"),
    (["--steps", "2", "--guidance", "-1"], "--guidance: guidance_scale must be a number >= 0, got -1"),
    (["--option", "temperature=-1"], "--option: temperature must be a number >= 0, got -1"),
    (["--option", "width=3"], "--option: AbsorbingPrior.sample has no option 'width'; valid options: order, schedule, "
                              "confidence_noise, shape, steps, temperature, top_k, top_p, guidance_scale, stride"),
]


@pytest.mark.parametrize("argv,message", BENCHMARK_BAD, ids=[" ".join(a) for a, _ in BENCHMARK_BAD])
def test_benchmark_refuses(argv, message, ckpts, tmp_path, capsys):
    assert refused("benchmark", ["-r", ckpts["prior"], *argv], tmp_path, capsys) == message


def test_benchmark_refuses_a_first_stage(ckpts, tmp_path, capsys):
    assert refused("benchmark", ["-r", ckpts["first_stage"]], tmp_path, capsys) == \
        "this is a first-stage checkpoint (ldm.first_stage.models.VQModel); benchmark.py needs a prior"
    assert refused("benchmark", ["--config", str(CONFIGS / "first_stage_vq.yaml")], tmp_path, capsys) == \
        "this is a first-stage checkpoint (ldm.first_stage.models.VQModel); benchmark.py needs a prior"


def test_benchmark_runs_writes_and_compares(ckpts, capsys, tmp_path):
    argv = ["-r", ckpts["prior"], "--batch", "2", "--steps", "2", "--repeats", "1", "--guidance", "2"]
    assert run(lambda: load("benchmark").main(argv)) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["steps"] == 2 and result["images_per_s"] > 0
    assert result["environment"]["threads"] >= 1 and result["environment"]["torch"] == torch.__version__
    first = tmp_path / "bench" / "first.json"
    assert run(lambda: load("benchmark").main([*argv, "--out", str(first)])) == 0
    assert json.loads(first.read_text())["steps"] == 2
    assert "| step_over_forward |" in first.with_suffix(".md").read_text()
    capsys.readouterr()
    assert run(lambda: load("benchmark").main([*argv, "--compare", str(first)])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index(f"against {first}:") + 1].startswith("  forward_s: ")
    assert refused("benchmark", [*argv, "--out", str(tmp_path / "b.txt")], tmp_path, capsys) == \
        f"--out must end in .json, got {tmp_path / 'b.txt'}"
    assert refused("benchmark", [*argv, "--compare", str(tmp_path / "none.json")], tmp_path, capsys).startswith(
        f"--compare: cannot read {tmp_path / 'none.json'} as an earlier benchmark result")


def test_benchmark_compares_cached_and_uncached_decoding(capsys):
    """ImageBART's --compare-cache: both decodings, interleaved, give the same samples; the dotted overrides
    of --config reach the model."""
    argv = ["--config", str(CONFIGS / "imagebart.yaml"), "--compare-cache", "--batch", "2", "--repeats", "1",
            "model.params.latent_shape=[4,4]"]
    assert run(lambda: load("benchmark").main(argv)) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["same_samples"] is True and result["tokens"] == 16 and result["speedup"] > 0


@pytest.mark.parametrize("guidance", ["1", "2"])
def test_benchmark_pairs_each_imagebart_token_with_its_replayed_decoder_step(guidance, capsys):
    """ImageBART's cached decoder steps are paired one by one with their replay (the sampler offers it)."""
    argv = ["--config", str(CONFIGS / "imagebart.yaml"), "--batch", "2", "--repeats", "1", "--guidance", guidance,
            "model.params.latent_shape=[4,4]"]
    assert run(lambda: load("benchmark").main(argv)) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["paired_per_step"] and result["replayed_inputs"] and result["steps_run"] == 2 * 16
    assert result["step_over_forward"] > 0 and "network_rows_per_image" not in result


@pytest.mark.parametrize("config", ["sundae.yaml", "ldm.yaml"])
def test_benchmark_one_step_trains_and_samples_a_config(config, capsys):
    assert run(lambda: load("benchmark").main(["--config", str(CONFIGS / config), "--one-step", "--batch", "1"])) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["sample_shape"][0] == 1 and result["train_step_s"] > 0 and result["peak_rss_gib"] > 0


def test_benchmark_times_training_from_the_cache_and_from_its_images(tmp_path, capsys):
    """--training: steps fed from a latent cache and steps that encode the images it was built from, both run;
    a prior that trains from images has no cache to compare and is told so."""
    from ldm.data.cache import build_cache, first_stage_fingerprint

    images = {"target": "tests.toy.ToyImages", "params": {"n": 8, "size": 16}}
    plain = save_checkpoint("absorbing.yaml", tmp_path / "plain.ckpt")
    config = torch.load(plain, weights_only=False)["config"]
    prior = instantiate_from_config(config["model"], key="model")
    fs = prior.first_stage_model
    build_cache(fs, instantiate_from_config(images), tmp_path / "cache", first_stage_fingerprint(fs),
                progress=False, extra_meta={"dataset": images})
    config["data"]["params"]["train"] = {"target": "ldm.data.cache.LatentCache",
                                         "params": {"root": str(tmp_path / "cache")}}
    cached = tmp_path / "cached.ckpt"
    torch.save({"state_dict": prior.state_dict(), "config": config}, cached)
    out = tmp_path / "bench" / "training.json"
    assert run(lambda: load("benchmark").main(["-r", str(cached), "--training", "2", "--batch", "4",
                                               "--out", str(out)])) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["tokens_per_image"] == 64 and result["pixels_from"].startswith(
        "the images the latent cache")
    for name in ("cache", "pixels"):
        assert result[f"{name}_images_per_s"] > 0
        assert result[f"{name}_tokens_per_s"] == pytest.approx(64 * result[f"{name}_images_per_s"])
    assert result["cache_over_pixels"] == pytest.approx(result["cache_images_per_s"] / result["pixels_images_per_s"])
    assert "| cache_over_pixels |" in out.with_suffix(".md").read_text()
    assert refused("benchmark", ["-r", plain, "--training", "2"], tmp_path / "bench", capsys) == (
        "--training compares training from a latent cache with encoding images on the fly; this prior's "
        "data.params.train is ldm.data.fmnist.FashionMNIST, not a latent cache")
    assert refused("benchmark", ["-r", str(cached), "--training", "0"], tmp_path / "bench", capsys) == \
        "--training must be >= 1, got 0"


@pytest.mark.parametrize("config", ["absorbing.yaml", "imagebart.yaml"])
def test_benchmark_cost_table_rebuilds_the_prior_at_each_size(config, tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = ["--config", str(CONFIGS / config), "--cost-table", "16,64", "--batch", "2", "--repeats", "1"]
    assert run(lambda: load("benchmark").main([*argv, "--out", str(out)])) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [16, 64] and [r["latent_shape"] for r in rows] == [[4, 4], [8, 8]]
    assert all(r["forward_backward_s"] > 0 for r in rows)
    assert rows[1]["activation_bytes"] > rows[0]["activation_bytes"]  # more tokens, more kept for backward
    assert out.with_suffix(".md").read_text().splitlines()[2].startswith("| 16 | 4x4 | 2 |")
    assert refused("benchmark", [*argv[:3], "15"], tmp_path, capsys) == \
        "--cost-table: 15 tokens are not a square map; give square numbers (256 = 16x16)"
    assert refused("benchmark", [*argv[:3], "64,x"], tmp_path, capsys) == \
        "--cost-table takes comma-separated integers, got '64,x'"


def test_benchmark_cost_table_times_a_second_build_interleaved(tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = ["--config", str(CONFIGS / "ldm.yaml"), "--cost-table", "16", "--batch", "2", "--repeats", "1"]
    assert run(lambda: load("benchmark").main([*argv, "--versus", "channels_last=true", "--out", str(out)])) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["optimizer_step_s"] > 0 and row["versus"]["forward_backward_s"] > 0
    assert row["versus"]["forward_backward_ratio"] == row["versus"]["forward_backward_s"] / row["forward_backward_s"]
    assert "With channels_last=true, timed interleaved" in out.with_suffix(".md").read_text()
    assert refused("benchmark", [*argv[:2], "--versus", "channels_last=true"], tmp_path, capsys) == (
        "--versus times a second build of the prior beside the first in --cost-table; give --cost-table too")
    assert "chanels_last" in refused("benchmark", [*argv, "--versus", "chanels_last=true"], tmp_path, capsys)


def test_benchmark_refuses_options_the_prior_lacks(ckpts, tmp_path, capsys):
    assert refused("benchmark", ["-r", ckpts["prior"], "--compare-cache"], tmp_path, capsys) == \
        "--compare-cache: AbsorbingPrior has no use_cache option"
    imagebart = ["--config", str(CONFIGS / "imagebart.yaml")]
    assert refused("benchmark", [*imagebart, "--steps", "4"], tmp_path, capsys).startswith(
        "--steps: ImageBARTPrior.sample has no option 'steps'")


def test_sample_takes_a_caption_for_a_text_prior(tmp_path):
    ckpt = save_checkpoint("ldm_text.yaml", tmp_path / "text.ckpt")
    out = tmp_path / "grid.png"
    argv = ["-r", ckpt, "-n", "2", "--cond", "a photo of a sandal", "steps=2", "--out", str(out)]
    assert run(lambda: load("sample").main(argv)) == 0 and out.exists()


# --- inpaint.py ---------------------------------------------------------------------------------------
def test_inpaint_writes_a_grid_per_mask(tmp_path):
    ckpt = save_checkpoint("absorbing.yaml", tmp_path / "prior.ckpt", **{"data.params.test": TOY_SPLIT})
    out = tmp_path / "grid.png"
    argv = ["-r", ckpt, "--mask", "upper,centre", "-n", "3", "--samples", "2", "steps=2", "--out", str(out)]
    assert run(lambda: load("inpaint").main(argv)) == 0
    from PIL import Image

    w, h = Image.open(out).size
    assert (w, h) == (2 + 3 * 18, 2 + 2 * 4 * 18)  # 3 columns; per mask: images, masked, 2 completions


def test_inpaint_refuses_bad_arguments(ckpts, tmp_path, capsys):
    base = ["-r", ckpts["prior"], "--out", str(tmp_path / "g.png")]
    assert refused("inpaint", [*base, "--mask", "middle"], tmp_path, capsys) == \
        "--mask: choose from upper, lower, left, centre, border, got 'middle'"
    assert refused("inpaint", [*base, "--samples", "0"], tmp_path, capsys) == "--samples must be >= 1, got 0"
    assert refused("inpaint", [*base, "shape=[8,8]"], tmp_path, capsys).startswith(
        "AbsorbingPrior.inpaint has no option 'shape'")


# --- eval_first_stage.py ------------------------------------------------------------------------------
def test_eval_first_stage_refuses(ckpts, tmp_path, capsys):
    vq = ["-r", ckpts["first_stage"], "--split", "validation", "--classifier", ""]
    assert refused("eval_first_stage", ["-r", ckpts["prior"], "--out", str(tmp_path / "m.json")], tmp_path, capsys) == \
        "this is a prior checkpoint (absorbing.model.AbsorbingPrior); eval_first_stage.py needs a first stage"
    assert refused("eval_first_stage", [*vq, "--batch-size", "0"], tmp_path, capsys) == "--batch-size must be >= 1, got 0"
    assert refused("eval_first_stage", [*vq, "--limit", "0"], tmp_path, capsys) == "--limit must be >= 1, got 0"
    assert refused("eval_first_stage", [*vq, "--out", str(tmp_path / "m.png")], tmp_path, capsys) == \
        f"--out must end in .json, got {tmp_path / 'm.png'}"


def test_eval_first_stage_runs(ckpts, tmp_path):
    out = tmp_path / "m.json"
    assert run(lambda: load("eval_first_stage").main(["-r", ckpts["first_stage"], "--split", "validation",
                                                      "--classifier", "", "--out", str(out)])) == 0
    assert "psnr" in {k.lower() for k in json.loads(out.read_text())}


# --- ldm.cli ------------------------------------------------------------------------------------------
def test_run_reports_a_message_exit_and_passes_on_a_status(capsys):
    def stop(code):
        raise SystemExit(code)

    assert run(lambda: stop("--per-class needs a class-conditional prior")) == 2
    assert capsys.readouterr().err == "error: --per-class needs a class-conditional prior\n"
    with pytest.raises(SystemExit) as e:  # argparse's own exit (it has printed its message) and --help
        run(lambda: stop(0))
    assert e.value.code == 0


def test_output_path_accepts_a_new_folder(tmp_path):
    assert output_path(tmp_path / "a" / "b" / "x.JSON", (".json",)) == tmp_path / "a" / "b" / "x.JSON"
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_an_output_path_on_a_file_system_that_refuses_writes_is_refused_before_work():
    """Permission bits say yes to root everywhere; /proc still refuses a new folder."""
    from ldm.cli import output_path

    with pytest.raises(ValueError, match=r"^--out /proc/nope/grid.png cannot be written: .* in /proc$"):
        output_path("/proc/nope/grid.png", (".png",))


@pytest.mark.slow  # compiling takes a minute or two on two cores
def test_benchmark_compiles_the_networks_and_reports_the_time(tmp_path, capsys):
    out = tmp_path / "compiled.json"
    argv = ["--config", str(CONFIGS / "sundae.yaml"), "--batch", "2", "--repeats", "1", "--steps", "2"]
    assert run(lambda: load("benchmark").main([*argv, "--compile", "--out", str(out)])) == 0
    result = json.loads(out.read_text())
    assert result["compile_s"] > 0 and result["replayed_inputs"]
    assert refused("benchmark", [*argv, "--compile", "--training", "2"], tmp_path, capsys) == \
        "--compile applies to the sampling benchmark, not to --training"
    assert refused("benchmark", ["--config", str(CONFIGS / "imagebart.yaml"), "--compile"], tmp_path, capsys) == (
        "--compile: ImageBART's sampler runs its decoder one position at a time on a growing key/value cache, "
        "which torch.compile would recompile at every length: sample it uncompiled")
