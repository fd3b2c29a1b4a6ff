"""The training entrypoint: run folders, checkpoints with their config, resuming, errors."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml

from ldm.checkpoint import read_checkpoint
from ldm.train import main, parse_gpus
from ldm.util import ConfigError

TOY = {
    "model": {"base_learning_rate": 1e-3, "target": "tests.toy.ToyAutoencoder", "params": {}},
    "data": {"target": "tests.toy.ToyData", "params": {"batch_size": 8}},
    "lightning": {
        "trainer": {"max_steps": 6, "enable_progress_bar": False, "log_every_n_steps": 1,
                    "val_check_interval": 4, "num_sanity_val_steps": 0},
        "checkpoint_every_n_steps": 2,
        "callbacks": {"image_logger": {"target": "ldm.callbacks.ImageLogger",
                                       "params": {"batch_frequency": 4, "max_images": 4}}},
    },
}


@pytest.fixture
def toy_config(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY))
    return str(path)


def run(args):
    return main(args)


def only_run(logroot):
    runs = glob.glob(os.path.join(logroot, "*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_train_writes_run_folder(toy_config, tmp_path, capsys):
    logroot = str(tmp_path / "logs")
    run(["--base", toy_config, "--scale_lr", "-t", "-l", logroot, "-n", "toy", "model.params.size=8"])
    out = capsys.readouterr().out
    assert "Setting learning rate to 8.00e-03 = 1 (accumulate_grad_batches) * 1 (devices) * 1 (nodes) * 8 (batch size)" in out
    logdir = only_run(logroot)
    assert logdir.endswith("_toy")
    assert os.path.exists(f"{logdir}/checkpoints/last.ckpt")
    assert glob.glob(f"{logdir}/checkpoints/best-*.ckpt")
    assert glob.glob(f"{logdir}/configs/*-project.yaml") and glob.glob(f"{logdir}/configs/*-lightning.yaml")
    assert glob.glob(f"{logdir}/images/train/reconstructions_gs-*.png")
    assert glob.glob(f"{logdir}/tensorboard/events.*") and os.path.exists(f"{logdir}/csv/metrics.csv")
    ckpt = read_checkpoint(f"{logdir}/checkpoints/last.ckpt")  # weights_only=True
    assert ckpt["global_step"] == 6
    assert ckpt["config"]["model"]["target"] == "tests.toy.ToyAutoencoder"
    assert ckpt["config"]["lightning"]["trainer"]["max_steps"] == 6


def test_resume_continues_step_and_optimizer(toy_config, tmp_path):
    logroot = str(tmp_path / "logs")
    run(["--base", toy_config, "-t", "-l", logroot, "--no-test"])
    logdir = only_run(logroot)
    first = read_checkpoint(f"{logdir}/checkpoints/last.ckpt")
    run(["-r", logdir, "-t", "--no-test", "--max_steps", "10"])
    assert only_run(logroot) == logdir  # same folder
    second = read_checkpoint(f"{logdir}/checkpoints/last.ckpt")
    assert second["global_step"] == 10
    adam_steps = [s["step"] for s in second["optimizer_states"][0]["state"].values()]
    assert all(float(s) == 10 for s in adam_steps)  # optimizer state carried over, not restarted
    assert not torch.equal(first["state_dict"]["net.1.weight"], second["state_dict"]["net.1.weight"])
    assert "StepSeed" in second["callbacks"]


def test_a_run_folder_in_use_is_refused(toy_config, tmp_path):
    from ldm.run_folder import RunLock

    logroot = str(tmp_path / "logs")
    run(["--base", toy_config, "-t", "-l", logroot, "--no-test"])
    logdir = only_run(logroot)
    lock = RunLock(logdir).acquire()  # as another training process would hold it
    try:
        with pytest.raises(ValueError, match=rf"the run folder {logdir} is in use by process {os.getpid()} on "):
            run(["-r", logdir, "-t", "--no-test", "--max_steps", "10"])
    finally:
        lock.release()
    assert read_checkpoint(f"{logdir}/checkpoints/last.ckpt")["global_step"] == 6  # untouched


def test_exception_saves_checkpoint(toy_config, tmp_path):
    logroot = str(tmp_path / "logs")
    with pytest.raises(RuntimeError, match="injected failure"):
        run(["--base", toy_config, "-t", "-l", logroot, "model.params.fail_at_step=3",
             "lightning.checkpoint_every_n_steps=100"])
    ckpt = read_checkpoint(f"{only_run(logroot)}/checkpoints/last.ckpt")
    assert ckpt["global_step"] == 3


def test_time_limit_keeps_the_final_state(toy_config, tmp_path):
    logroot = str(tmp_path / "logs")
    run(["--base", toy_config, "-t", "--no-test", "-l", logroot, "lightning.checkpoint_every_n_steps=4",
         "lightning.trainer.max_steps=7"])
    assert read_checkpoint(f"{only_run(logroot)}/checkpoints/last.ckpt")["global_step"] == 7


def test_bad_override_names_key(toy_config, tmp_path):
    with pytest.raises(ConfigError, match=r"model.params: tests.toy.ToyAutoencoder does not accept 'sise'"):
        run(["--base", toy_config, "-t", "-l", str(tmp_path), "model.params.sise=8"])
    with pytest.raises(ConfigError, match=r"lightning.trainer: .*Trainer does not accept 'max_step'"):
        run(["--base", toy_config, "-t", "-l", str(tmp_path), "lightning.trainer.max_step=8"])


@pytest.mark.parametrize("override, message", [
    ("lightning.checkpoint_every_n_step=5",
     "lightning.checkpoint_every_n_step: unknown key (did you mean 'checkpoint_every_n_steps'?); lightning holds "
     "trainer, callbacks, modelcheckpoint, checkpoint_every_n_steps"),
    ("lightning.checkpoint_every_n_steps=0", "lightning.checkpoint_every_n_steps: expected an integer >= 1, got 0"),
    ("lightning.modelcheckpoint.params.save_top=2", "lightning.modelcheckpoint.params: "
     "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint does not accept 'save_top' (did you mean "
     "'save_top_k'?)"),
    ("lightning.trainer.max_steps=ten", "lightning.trainer.max_steps: expected an integer, got 'ten' (str)"),
    ("data.params.batch_size=eight", "data.params.batch_size: expected an integer, got 'eight' (str)"),
])
def test_bad_lightning_and_typed_values_name_key_and_nothing_is_written(toy_config, tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        run(["--base", toy_config, "-t", "-l", str(tmp_path / "logs"), override])
    assert str(e.value).startswith(message)
    assert not (tmp_path / "logs").exists()


def test_resume_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        run(["-r", str(tmp_path / "nope"), "-t"])
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="no checkpoint was saved"):
        run(["-r", str(tmp_path / "run"), "-t"])


def test_parse_gpus():
    assert parse_gpus("0,") == [0]
    assert parse_gpus("0,1") == [0, 1]
    assert parse_gpus("") is None and parse_gpus(None) is None


def test_step_seed_depends_only_on_the_batch_position():
    """Whatever ran before a batch, its random draws are the same: what makes a resume exact."""
    from types import SimpleNamespace

    from ldm.callbacks import StepSeed

    cb = StepSeed(5)
    trainer = SimpleNamespace(current_epoch=2)
    cb.on_train_batch_start(trainer, None, None, 7)
    expected = torch.rand(3)
    torch.rand(100)  # e.g. a validation pass in between
    cb.load_state_dict(StepSeed(5).state_dict())
    cb.on_train_batch_start(trainer, None, None, 7)
    assert torch.equal(torch.rand(3), expected)
    cb.on_train_batch_start(trainer, None, None, 8)
    assert not torch.equal(torch.rand(3), expected)


def test_config_bf16_on_a_cpu_without_native_bf16_trains_in_float32(monkeypatch, capsys):
    import ldm.train as train

    cfg = {"accelerator": "cpu", "precision": "bf16-mixed", "max_steps": 3}
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.cpu_precision(cfg) == {**cfg, "precision": "32-true"}
    assert "no native bfloat16" in capsys.readouterr().out
    assert train.cpu_precision({**cfg, "accelerator": "gpu"})["precision"] == "bf16-mixed"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.cpu_precision(cfg) == cfg
