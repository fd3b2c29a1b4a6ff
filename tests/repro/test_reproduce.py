"""`scripts/reproduce.py` end to end on the tiny configs: the table's rows and columns, a rerun that does no
work, and runs stopped during a training and during an evaluation that finish with the same table.

The first stages are tiny random models written as main.py writes checkpoints, their latent caches built in
this process (the runner judges them finished from their meta.json); the priors are trained, evaluated and
drawn by the runner's subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import read_checkpoint
from ldm.repro.spec import load_spec
from ldm.repro.table import comparable
from ldm.util import ConfigError, instantiate_from_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "test" / "repro_tiny.yaml"


def first_stage(key: str, root: Path) -> list[str]:
    """A random tiny first stage as the tiny repro config builds it, and its caches: the overrides that name them."""
    from ldm.data.cache import cache_split

    fs = load_spec(TINY).first_stages[key]
    cfg = OmegaConf.merge(OmegaConf.load(REPO / fs.config), OmegaConf.from_dotlist(fs.overrides))
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = instantiate_from_config(config["model"], key="model")
    ckpt = root / f"{key}.ckpt"
    torch.save({"state_dict": model.state_dict(), "config": config, "global_step": 0}, ckpt)
    for split in ("train", "validation", "test"):
        cache_split(ckpt, split, root / "cache" / key / split, progress=False)
    return [f"first_stages.{key}.checkpoint={ckpt}", f"first_stages.{key}.cache={root / 'cache' / key}",
            f"first_stages.{key}.train=null"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("first_stages")
    return first_stage("vq", root) + first_stage("kl", root)


def command(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "reproduce.py"), str(TINY), "--out", str(out / "results"),
            "--logdir", str(out / "logs"), *args]


def reproduce(out: Path, *args: str) -> str:
    done = subprocess.run(command(out, *args), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def table(out: Path) -> dict:
    return json.loads((out / "results" / "table.json").read_text())


ABSORBING = ["--only", "absorbing", "evaluation.floor=false"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, stages) -> Path:
    """One uninterrupted run of the absorbing prior, timed."""
    out = tmp_path_factory.mktemp("baseline")
    t0 = time.time()
    reproduce(out, *ABSORBING, *stages)
    print(f"\nreproduce.py, tiny absorbing prior: {time.time() - t0:.1f} s")
    return out


def test_one_command_writes_the_table(baseline):
    t = table(baseline)
    assert [r["kind"] for r in t["rows"]] == ["reconstructions", "prior"]
    row = t["rows"][1]
    for column in ("FD_fmnist", "precision", "recall", "density", "coverage", "nll_bits", "conditional_accuracy",
                   "conditional_accuracy_guided", "network_evaluations_per_sample", "seconds_per_sample"):
        assert column in row, column
    assert isinstance(row["nll_bits"], float) and row["training_steps"] == 24
    assert [p["steps"] for p in t["sweeps"]["absorbing"]] == [2, 4]
    results = baseline / "results"
    md = (results / "table.md").read_text()
    assert "| absorbing diffusion |" in md and "accuracy, guided" in md and "network evaluations / sample" in md
    assert "<polyline" in (results / "fd_vs_seconds.svg").read_text()
    assert (results / t["grids"]["absorbing"]).stat().st_size > 0
    runs = list((baseline / "logs").glob("*_tiny_absorbing"))
    assert len(runs) == 1 and read_checkpoint(runs[0] / "checkpoints" / "last.ckpt")["global_step"] == 24


def test_a_finished_table_is_not_redone(baseline, stages):
    before = (baseline / "results" / "table.json").read_text()
    stdout = reproduce(baseline, *ABSORBING, *stages)
    assert "ran 0 of 7 steps" in stdout, stdout
    assert comparable(json.loads(before)) == comparable(table(baseline))


def stop_when(out: Path, stages: list[str], ready, timeout: float = 300) -> int:
    """Start the runner, send it SIGTERM once `ready()` holds, and return its exit status."""
    proc = subprocess.Popen(command(out, *ABSORBING, *stages), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before it could be stopped:\n{proc.stdout.read()}"
            assert time.time() - t0 < timeout
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode


@pytest.mark.slow
def test_stopped_during_training_and_evaluation_then_rerun_gives_the_same_table(baseline, stages, tmp_path):
    out = tmp_path
    last = out / "logs"

    def checkpoint() -> Path | None:
        found = list(last.glob("*_tiny_absorbing/checkpoints/last.ckpt"))
        return found[0] if found else None

    assert stop_when(out, stages, lambda: checkpoint() is not None) == 128 + signal.SIGTERM
    step = read_checkpoint(checkpoint())["global_step"]
    assert 0 < step < 24, f"stopped at step {step}: not during the training"

    samples = out / "results" / "eval" / "absorbing.samples"
    assert stop_when(out, stages, lambda: any(samples.glob("*/batch-*.pt"))) == 128 + signal.SIGTERM
    main = out / "results" / "eval" / "absorbing.json"
    assert not main.exists() or len(json.loads(main.read_text())["rows"]) < 2, "not stopped during the evaluation"
    kept = len(list(samples.glob("*/batch-*.pt")))

    stdout = reproduce(out, *ABSORBING, *stages)
    assert "ran 3 of 7 steps" in stdout, stdout
    assert kept >= 1
    assert len(list(last.glob("*_tiny_absorbing"))) == 1, "the training was not continued in its run folder"
    assert comparable(table(out)) == comparable(table(baseline))


@pytest.mark.slow
def test_every_prior_on_its_first_stage(stages, tmp_path):
    reproduce(tmp_path, "evaluation.sweep_samples=8", *stages)
    t = table(tmp_path)
    assert [r["row"] for r in t["rows"]] == [
        "data: test split, one half against the other", "data: test split against train", "VQ (tiny): reconstructions",
        "KL (tiny): reconstructions", "absorbing diffusion", "SUNDAE", "ImageBART", "latent diffusion"]
    rows = {r.get("prior"): r for r in t["rows"]}
    assert rows["sundae"]["nll_bits"] == "n/a" and isinstance(rows["imagebart"]["nll_bits"], float)
    assert set(t["sweeps"]) == {"absorbing", "sundae", "imagebart", "ldm"} and len(t["sweeps"]["imagebart"]) == 1
    assert set(t["grids"]) == set(t["sweeps"])


def test_a_misspelt_flag_is_refused_not_taken_for_an_override(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    args, overrides = reproduce.parse_args([str(TINY), "--only", "absorbing", "evaluation.num_samples=8"])
    assert args.only == "absorbing" and overrides == ["evaluation.num_samples=8"]
    with pytest.raises(SystemExit):
        reproduce.parse_args([str(TINY), "--table_only"])
    assert "unrecognized arguments: --table_only (config overrides are written key=value)" in capsys.readouterr().err


def test_a_finished_first_stage_is_exported_where_the_config_names_safetensors(tmp_path):
    """A first stage the runner trained goes to its `checkpoint`: copied, or, for a .safetensors name (how the
    project ships its Fashion-MNIST first stages), exported with its config beside it and read back whole."""
    from ldm.checkpoint import instantiate_from_checkpoint
    from ldm.repro.steps import Plan

    spec = load_spec(TINY)
    fs = spec.first_stages["vq"]
    run_dir = tmp_path / "logs" / "2026-01-01T00-00-00_tiny_vq" / "checkpoints"
    run_dir.mkdir(parents=True)
    cfg = OmegaConf.merge(OmegaConf.load(REPO / fs.config), OmegaConf.from_dotlist(fs.overrides))
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = instantiate_from_config(config["model"], key="model")
    torch.save({"state_dict": model.state_dict(), "config": config, "global_step": fs.train.max_steps},
               run_dir / "last.ckpt")
    fs.checkpoint = str(tmp_path / "shipped" / "vq.safetensors")
    plan = Plan(spec, tmp_path / "results", tmp_path / "logs")
    path = plan.first_stage_checkpoint(fs)
    assert path == tmp_path / "shipped" / "vq.safetensors" and (tmp_path / "shipped" / "vq.yaml").exists()
    loaded, stored = instantiate_from_checkpoint(path)
    assert stored["model"]["target"] == config["model"]["target"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items() if k in
               loaded.state_dict())
    assert plan.first_stage_checkpoint(fs) == path  # found as it is from now on


@pytest.mark.parametrize("setting", [True, False, "auto"])
def test_evaluations_run_in_bfloat16_where_the_config_says(setting, tmp_path, monkeypatch):
    """`evaluation.bf16`: on, off, or `auto`, on where the hardware runs bfloat16 natively; anything else is
    refused by its key."""
    from ldm.repro import steps
    from ldm.repro.steps import Plan

    monkeypatch.setattr("ldm.train.cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = load_spec(TINY, [f"evaluation.bf16={str(setting).lower()}"])
    args, _ = Plan(spec, tmp_path / "results", tmp_path / "logs").evaluate_args(spec.priors["absorbing"], "main")
    assert ("--bf16" in args) == (setting is not False)
    monkeypatch.setattr("ldm.train.cpu_has_native_bf16", lambda: False)
    assert steps.native_bf16("auto") is False and steps.native_bf16(True) is True
    with pytest.raises(ConfigError, match=r"evaluation.bf16: must be true, false or auto, got 'sometimes'"):
        load_spec(TINY, ["evaluation.bf16=sometimes"])
