"""scripts/evaluate.py end to end on tiny random priors: the runner's columns in every row, an interrupted run
resumed to the numbers of an uninterrupted one, two processes (as under torchrun) equal to one, the
memorisation grid, "n/a" for a prior without likelihood, and the Inception path refused offline."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from ldm.cli import run
from ldm.util import instantiate_from_config
from tests.test_script_checks import CONFIGS, TOY_SPLIT
from tests.test_scripts import load

SPLIT = {"target": "tests.toy.ToyImages", "params": {"n": 24, "size": 16}}  # more images than PRDC's k
TIMING = {"seconds", "seconds_per_sample", "peak_memory_mb", "peak_memory_mb_per_sample"}
RUNNER_COLUMNS = {"FD_fmnist", "precision", "recall", "density", "coverage", "nll_bits", "conditional_accuracy",
                  "network_evaluations_per_sample", "seconds_per_sample"}


def evaluate():
    return load("evaluate")


def argv(ckpt: str, out: Path, *extra: str) -> list[str]:
    return ["-r", ckpt, "-n", "10", "--batch-size", "4", "--sweep", "steps=2", "--kid-subsets", "3",
            "--out", str(out), *extra]


def save_checkpoint(config_name: str, path: Path) -> str:
    """A randomly initialised tiny prior with toy images as its test (24) and train and validation (4) splits."""
    cfg = OmegaConf.load(CONFIGS / config_name)
    for split, data in (("test", SPLIT), ("train", TOY_SPLIT), ("validation", TOY_SPLIT)):
        OmegaConf.update(cfg, f"data.params.{split}", data, merge=False)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    torch.save({"state_dict": instantiate_from_config(config["model"], key="model").state_dict(), "config": config},
               path)
    return str(path)


def numbers(out: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in json.loads(out.read_text())["rows"]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint("absorbing.yaml", tmp_path_factory.mktemp("ckpt") / "prior.ckpt")


@pytest.fixture(scope="module")
def uninterrupted(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "eval.json"
    assert run(lambda: evaluate().main(argv(ckpt, out))) == 0
    return out


def test_rows_carry_the_runner_columns(uninterrupted):
    result = json.loads(uninterrupted.read_text())
    row = result["rows"][0]
    assert RUNNER_COLUMNS <= set(row) and row["steps"] == 2 and row["nll_bits"] is None  # --elbo-limit 0
    assert {"KID_fmnist", "KID_fmnist_std", "IS_fmnist", "peak_memory_mb"} <= set(row)
    assert 0 <= row["precision"] <= 1 and 0 <= row["coverage"] <= 1 and row["network_evaluations_per_sample"] > 0
    assert RUNNER_COLUMNS - {"nll_bits", "network_evaluations_per_sample", "seconds_per_sample"} <= \
        set(result["first_stage_reconstructions"])
    assert result["features"].startswith("fmnist-") and result["preprocessing"] == "uint8"
    assert result["nll_unit"] == "bits per token"
    # the options a row does not sweep are on record, as the prior resolved them
    assert result["sampler_defaults"]["temperature"] == 1.0 and result["sampler_defaults"]["order"] == "random"
    table = uninterrupted.with_suffix(".md").read_text()
    assert "| steps | FD_fmnist | conditional_accuracy |" in table and "precision" in table
    assert len(list(Path(result["work_dir"]).glob("*/batch-*.pt"))) == 3  # 10 samples in batches of 4


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_numbers(ckpt, uninterrupted, tmp_path, monkeypatch):
    script = evaluate()
    draw, calls = script.draw_record, []

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise Interrupted
        return draw(*args, **kwargs)

    monkeypatch.setattr(script, "draw_record", failing)
    out = tmp_path / "eval.json"
    with pytest.raises(Interrupted):
        script.main(argv(ckpt, out))
    calls.clear()
    monkeypatch.setattr(script, "draw_record", lambda *a, **k: calls.append(a[1]) or draw(*a, **k))
    assert run(lambda: script.main(argv(ckpt, out))) == 0
    assert calls == [4, 8]  # the batch that was finished is not drawn again
    assert numbers(out) == numbers(uninterrupted)
    calls.clear()
    assert run(lambda: script.main(argv(ckpt, out))) == 0 and calls == []  # all stored: nothing drawn
    assert numbers(out) == numbers(uninterrupted)


def _rank(rank: int, world: int, args: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    assert run(lambda: evaluate().main(args)) == 0


def test_two_processes_give_the_numbers_of_one(ckpt, uninterrupted, tmp_path):
    out = tmp_path / "eval.json"
    # spawned, as two torchrun ranks would start: a fork of this process can inherit a lock some thread of it
    # held (the test hung that way) and wait on it forever
    mp.start_processes(_rank, args=(2, argv(ckpt, out)), nprocs=2, join=True, start_method="spawn")
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and numbers(out) == numbers(uninterrupted)


def test_memorisation_grid_and_no_likelihood(tmp_path):
    """SUNDAE has no likelihood: its rows say n/a. The grid shows each sample beside its nearest training images."""
    ckpt = save_checkpoint("sundae.yaml", tmp_path / "sundae.ckpt")
    out = tmp_path / "eval.json"
    assert run(lambda: evaluate().main(["-r", ckpt, "-n", "6", "--batch-size", "6", "--kid-subsets", "2",
                                        "--memorization", "3", "--out", str(out)])) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["nll_bits"] == "n/a" and Path(row["memorization_grid"]).stat().st_size > 0
    assert row["nearest_train_distance"] >= 0 and row["nearest_train_ratio"] is not None


def test_inception_is_refused_offline_in_one_sentence(ckpt, tmp_path, monkeypatch, capsys):
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    assert run(lambda: evaluate().main(argv(ckpt, tmp_path / "e.json", "--features", "inception"))) == 2
    assert "cannot load the Inception weights" in capsys.readouterr().err


def test_plot_draws_a_cost_curve_per_setting(ckpt, tmp_path, capsys):
    out, svg = tmp_path / "eval.json", tmp_path / "orders.svg"
    assert run(lambda: evaluate().main(["-r", ckpt, "-n", "10", "--batch-size", "4", "--kid-subsets", "3", "--out",
                                        str(out), "--sweep", "order=random,raster", "steps=1,2", "--plot", str(svg)])) == 0
    drawing = svg.read_text()
    assert drawing.count("<polyline") == 2 and "order=random" in drawing and "order=raster" in drawing
    assert drawing.count("<circle") == 4  # a point per (order, steps) row
    bad = [*argv(ckpt, out), "--plot", str(svg), "--plot-along", "temperature"]
    assert run(lambda: evaluate().main(bad)) != 0
    assert "--plot-along temperature: not a --sweep key (steps); each curve runs along one swept setting" in \
        capsys.readouterr().err


def test_a_bracketed_sweep_value_is_one_setting():
    """Per-scale options are swept as lists: `temperature=[1.0,1.0,0.7],0.9` is two settings; a malformed entry
    is refused naming it."""
    parse = evaluate().parse_sweep
    assert parse(["temperature=[1.0,1.0,0.7],0.9", "steps=4,8"]) == {"temperature": [[1.0, 1.0, 0.7], 0.9],
                                                                     "steps": [4, 8]}
    for bad in ("t=1,,2", "t=[1,2", "t=", "t=1,[2]x"):
        with pytest.raises(SystemExit, match=r"--sweep entries look like name=v1,v2 \(a list in brackets is one "
                                             rf"value\); got '{re.escape(bad)}'"):
            parse([bad])
