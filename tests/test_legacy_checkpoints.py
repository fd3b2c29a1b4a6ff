"""Checkpoints as pytorch-lightning 1.0 (taming-transformers) and 1.4 (latent-diffusion) wrote them load,
and nothing they pickle besides the weights is imported or run.

The Lightning and OmegaConf classes are stand-ins registered under their original module names only
while `torch.save` runs, so the files name exactly the globals the released checkpoints name.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PosixPath

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError, instantiate_from_checkpoint, load_state_dict, read_checkpoint
from ldm.safe_unpickle import NumpyArray, Placeholder, restricted_load
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "test"
MODEL_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


# --- stand-ins for the classes Lightning 1.x and OmegaConf 2.0 pickled ------------------------------
class ModelCheckpoint:
    """Only pickled as a class (the key of ``callbacks``) and, in a payload test, as an instance."""

    def __init__(self, dirpath: PosixPath):
        self.dirpath = dirpath


class ContainerMetadata:
    def __init__(self) -> None:
        self.ref_type, self.object_type, self.key_type, self.element_type = typing.Any, dict, typing.Any, typing.Any
        self.optional, self.key, self.flags = True, None, {}
        self.resolver_cache = collections.defaultdict(dict)


class AnyNode:
    def __init__(self, value: object, parent: object):
        self._val, self._parent, self._metadata = value, parent, ContainerMetadata()


class DictConfig:
    """OmegaConf 2.0 pickles ``__dict__``: metadata, parent and a dict of nodes."""

    def __init__(self, content: dict):
        self._metadata, self._parent = ContainerMetadata(), None
        self._content = {k: AnyNode(v, self) for k, v in content.items()}


STAND_INS = {
    MODEL_CHECKPOINT: ModelCheckpoint,
    "omegaconf.base.ContainerMetadata": ContainerMetadata,
    "omegaconf.nodes.AnyNode": AnyNode,
    "omegaconf.dictconfig.DictConfig": DictConfig,
}


@contextmanager
def stand_in_modules() -> Iterator[None]:
    """The stand-ins under their original dotted names, only for the duration of a save."""
    modules = {m.rsplit(".", 1)[0] for m in STAND_INS}
    names = {".".join(m.split(".")[: i + 1]) for m in modules for i in range(m.count(".") + 1)}
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        for n in sorted(names):
            sys.modules[n] = types.ModuleType(n)
        for dotted, cls in STAND_INS.items():
            module, name = dotted.rsplit(".", 1)
            cls.__module__, cls.__qualname__ = module, name
            setattr(sys.modules[module], name, cls)
        yield
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        for cls in STAND_INS.values():
            cls.__module__ = __name__


class Payload:
    """Pickles as a call of `func(*args)`: what a malicious checkpoint would run on load."""

    def __init__(self, func: object, *args: object):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> list[Payload]:
    return [
        Payload(os.system, f"touch {marker}"),
        Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        Payload(subprocess.Popen, ["touch", str(marker)]),
        Payload(importlib.import_module, "pwned_module"),
    ]


def optimizer_and_scheduler(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    params = [torch.nn.Parameter(v.clone().float()) for v in list(state.values())[:2]]
    opt = torch.optim.Adam(params, lr=4.5e-6, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched.step()
    return opt.state_dict(), sched.state_dict()  # Lightning 1.x stores each scheduler's state_dict


def write_lightning_ckpt(path: Path, state: dict[str, torch.Tensor], version: str = "1.4.2",
                         zipped: bool = True, extra: dict | None = None) -> None:
    """A checkpoint with the keys Lightning `version` writes, saved with the stand-ins registered."""
    opt_state, sched_state = optimizer_and_scheduler(state)
    callback = {"best_model_score": torch.tensor(0.0625), "best_model_path": "/logs/ckpts/epoch=6.ckpt"}
    if version.startswith("1.4"):
        callback.update(monitor="val/rec_loss", current_score=torch.tensor(0.07),
                        dirpath=PosixPath("/logs/2021-06-01/checkpoints"))
    ckpt = {
        "epoch": 7,
        "global_step": 1234,
        "pytorch-lightning_version": version,
        "state_dict": collections.OrderedDict(state),
        "callbacks": {ModelCheckpoint: callback},
        "optimizer_states": [opt_state],
        "lr_schedulers": [sched_state],
        "hparams_name": "kwargs",
        "hyper_parameters": DictConfig({"embed_dim": 16, "base_learning_rate": np.float64(4.5e-6),
                                        "seed": np.int64(23), "log_dir": PosixPath("/logs/2021-06-01")}),
        "numpy": {"scalar": np.float32(0.25), "array": np.arange(6, dtype=np.float32).reshape(2, 3)},
        **(extra or {}),
    }
    with stand_in_modules():
        torch.save(ckpt, path, _use_new_zipfile_serialization=zipped)


def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4))
    return {f"encoder.{k}": v for k, v in net.state_dict().items()}


def build(config: str) -> torch.nn.Module:
    torch.manual_seed(1)
    return instantiate_from_config(OmegaConf.load(CONFIGS / config).model, key="model")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- (a) the weights and the few other things callers read ------------------------------------------
@pytest.mark.parametrize("version,zipped", [("1.0.8", True), ("1.4.2", True), ("1.4.2", False)])
def test_lightning_1x_checkpoint_loads(tmp_path, version, zipped):
    state = tiny_state()
    path = tmp_path / "last.ckpt"
    write_lightning_ckpt(path, state, version, zipped)
    with pytest.raises(Exception, match="Unsupported global"):  # why the fallback exists
        torch.load(path, weights_only=True)
    loaded = load_state_dict(path)
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    ckpt = read_checkpoint(path)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["pytorch-lightning_version"]) == (7, 1234, version)
    [(key, callback)] = ckpt["callbacks"].items()
    assert issubclass(key, Placeholder) and key.target == MODEL_CHECKPOINT  # a class never imported
    assert torch.equal(callback["best_model_score"], torch.tensor(0.0625))
    assert callback["best_model_path"] == "/logs/ckpts/epoch=6.ckpt"
    assert isinstance(ckpt["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 1
    hparams = ckpt["hyper_parameters"]
    assert hparams.target == "omegaconf.dictconfig.DictConfig"
    content = hparams.state["_content"]
    assert content["base_learning_rate"].state["_val"] == 4.5e-6 and content["seed"].state["_val"] == 23
    log_dir = content["log_dir"].state["_val"]
    assert log_dir.target == "pathlib.PosixPath" and log_dir.args == ("/", "logs", "2021-06-01")
    assert hparams.state["_metadata"].state["ref_type"].target == "typing.Any"
    assert ckpt["numpy"]["scalar"] == 0.25 and isinstance(ckpt["numpy"]["array"], NumpyArray)
    assert torch.equal(ckpt["numpy"]["array"].value, torch.arange(6.0).reshape(2, 3))


def test_current_checkpoints_still_use_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "new.ckpt"
    torch.save({"state_dict": tiny_state(), "global_step": 3}, path)
    monkeypatch.setattr("ldm.checkpoint.restricted_load", lambda *a: pytest.fail("fell back"))
    assert read_checkpoint(path)["global_step"] == 3


# --- (b) real first stages through ckpt_path ---------------------------------------------------------
@pytest.mark.parametrize("config", ["first_stage_vq.yaml", "first_stage_kl.yaml"])
def test_first_stage_loads_legacy_ckpt_path(tmp_path, config):
    trained = build(config)
    path = tmp_path / "model.ckpt"
    write_lightning_ckpt(path, trained.state_dict(), "1.0.8" if "vq" in config else "1.4.2")
    cfg = OmegaConf.load(CONFIGS / config)
    cfg.model.params.ckpt_path = str(path)
    loaded = instantiate_from_config(cfg.model, key="model")
    assert type(loaded) is type(trained)
    assert_same_weights(loaded, trained)


# --- (c) pickled code never runs, and the weights still load ---------------------------------------
@pytest.fixture
def audit_events():
    """Audit events (imports, os.system, subprocess.Popen, exec, pickle.find_class) raised in a block."""
    events: list[tuple[str, tuple]] = []
    active = {"on": False}
    watched = {"import", "os.system", "subprocess.Popen", "exec", "pickle.find_class", "os.exec", "os.posix_spawn"}

    def hook(event: str, args: tuple) -> None:
        if active["on"] and event in watched:
            events.append((event, args))

    sys.addaudithook(hook)  # cannot be removed; inert once the test has ended

    @contextmanager
    def recording() -> Iterator[list]:
        active["on"] = True
        try:
            yield events
        finally:
            active["on"] = False

    return recording


def test_pickled_payloads_never_run(tmp_path, monkeypatch, audit_events):
    marker = tmp_path / "pwned"
    (tmp_path / "pwned_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    state = tiny_state()
    evil = payloads(marker)
    path = tmp_path / "evil.ckpt"
    write_lightning_ckpt(path, state, extra={"loops": evil, "payload": evil[0]})
    # the payloads also sit where the callback state and the hyperparameters are
    with stand_in_modules():
        blob = {"state_dict": state, "callbacks": {ModelCheckpoint: {"best_model_score": evil[1], "x": evil}},
                "hyper_parameters": DictConfig({"lr": evil[3]}), "obj": ModelCheckpoint(evil[4])}
        torch.save(blob, tmp_path / "evil2.ckpt")
    report: list = []
    with audit_events() as events:
        for p in (path, tmp_path / "evil2.ckpt"):
            loaded = load_state_dict(p)
            assert all(torch.equal(loaded[k], state[k]) for k in state)
        restricted_load(path, report)
    assert not marker.exists()
    assert "pwned_module" not in sys.modules
    live = tmp_path / "live"  # the same payloads do run under a plain unpickler
    pickle.loads(pickle.dumps(Payload(builtins.eval, f"open({str(live)!r}, 'w').close()"), protocol=2))
    assert live.exists()
    assert not [e for e in events if e[0] != "import"], events  # no find_class, system, Popen, exec
    imported = {e[1][0] for e in events if e[0] == "import"}
    assert not imported & {"pwned_module", "pytorch_lightning", "omegaconf", "subprocess", "importlib"}, imported
    refused = {r.name for r in report if not r.allowed}
    assert {"posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "importlib.import_module",
            MODEL_CHECKPOINT, "omegaconf.dictconfig.DictConfig", "typing.Any", "pathlib.PosixPath"} <= refused
    allowed = {r.name for r in report if r.allowed}
    assert allowed <= {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "builtins.dict",
                       "numpy._core.multiarray.scalar", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                       "numpy.ndarray", "_codecs.encode", "builtins.object"}, allowed
    loops = read_checkpoint(path)["loops"]  # each payload comes back as a record of the call it asked for
    assert [p.target for p in loops] == ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                         "importlib.import_module"]
    assert loops[0].args == (f"touch {marker}",) and loops[3].args == (["touch", str(marker)],)


def test_loading_imports_no_module_the_file_names(tmp_path):
    """In a fresh interpreter: neither Lightning nor OmegaConf gets imported to read their objects."""
    path = tmp_path / "last.ckpt"
    write_lightning_ckpt(path, tiny_state())
    code = (
        "import sys\n"
        "from ldm.checkpoint import load_state_dict, read_checkpoint\n"
        "before = set(sys.modules)\n"
        f"assert len(load_state_dict({str(path)!r})) == 4\n"
        f"read_checkpoint({str(path)!r})\n"
        "new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning_fabric', 'omegaconf', 'pathlib', 'typing'))\n"
        "print('NEW', new, 'PL' if 'pytorch_lightning' in sys.modules else 'no-PL')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "NEW [] no-PL" in out, out


# --- damaged files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("zipped", [True, False])
def test_truncated_checkpoint_is_named(tmp_path, zipped):
    path = tmp_path / "cut.ckpt"
    write_lightning_ckpt(path, tiny_state(), zipped=zipped)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=f"cannot read {path}: the file is truncated"):
        load_state_dict(path)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(Exception, match="TorchScript"):
        restricted_load(path)


# --- (d) a checkpoint without a config, with the config given separately -----------------------------
def test_instantiate_from_legacy_checkpoint_with_config(tmp_path):
    trained = build("first_stage_vq.yaml")
    path = tmp_path / "last.ckpt"
    write_lightning_ckpt(path, trained.state_dict(), "1.0.8")
    with pytest.raises(CheckpointError, match="carries no config"):
        instantiate_from_checkpoint(path)
    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / "first_stage_vq.yaml"), resolve=True)
    model, _ = instantiate_from_checkpoint(path, config=config)
    assert_same_weights(model, trained)


def test_sample_script_with_config(tmp_path):
    prior = build("absorbing.yaml")
    path = tmp_path / "prior.ckpt"
    write_lightning_ckpt(path, prior.state_dict())
    out = tmp_path / "grid.png"
    run = subprocess.run([sys.executable, "scripts/sample.py", "-r", str(path), "--config",
                          str(CONFIGS / "absorbing.yaml"), "-n", "2", "--cond", "3", "steps=2", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.exists() and "wrote" in run.stdout


# --- scripts/export_weights.py ---------------------------------------------------------------------
def export_weights(*argv: str) -> None:
    spec = importlib.util.spec_from_file_location("export_weights", REPO / "scripts" / "export_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(argv)) == 0


def test_export_legacy_checkpoint_then_build_from_export(tmp_path):
    prior = build("absorbing.yaml")
    with torch.no_grad():
        for p in prior.model_ema.averaged.parameters():  # an EMA that differs from the trained weights
            p.add_(1.0)
    path = tmp_path / "prior.ckpt"
    write_lightning_ckpt(path, prior.state_dict())
    export_weights(str(path), "--config", str(CONFIGS / "absorbing.yaml"), "--out", str(tmp_path / "out" / "prior"))
    weights, config = tmp_path / "out" / "prior.safetensors", tmp_path / "out" / "prior.yaml"
    assert load_state_dict(weights).keys() == prior.state_dict().keys()
    model, _ = instantiate_from_checkpoint(weights, config=OmegaConf.to_container(OmegaConf.load(config)))
    assert_same_weights(model, prior)  # weights and EMA shadow both
    model, stored = instantiate_from_checkpoint(weights)  # the config beside the weights is found
    assert_same_weights(model, prior)
    assert stored["model"]["target"] == "absorbing.model.AbsorbingPrior"

    export_weights(str(path), "--ema", "--out", str(tmp_path / "ema"))
    ema = load_state_dict(tmp_path / "ema.safetensors")
    assert not (tmp_path / "ema.yaml").exists()  # the file carries no config and none was given
    with pytest.raises(CheckpointError, match=r"ema.safetensors carries no config \(it was not written by main.py "
                                              r"and no ema.yaml lies beside it\); pass the config explicitly"):
        instantiate_from_checkpoint(tmp_path / "ema.safetensors")
    assert not any(k.startswith("model_ema.") for k in ema)
    assert torch.equal(ema["model.net.to_logits.weight"], prior.model_ema.averaged.net.to_logits.weight)
    assert torch.equal(ema["first_stage_model.encoder.conv_in.weight"],
                       prior.first_stage_model.encoder.conv_in.weight)


def test_export_writes_the_stored_config(tmp_path):
    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / "first_stage_kl.yaml"))
    model = build("first_stage_kl.yaml")
    torch.save({"state_dict": model.state_dict(), "config": config, "global_step": 9}, tmp_path / "last.ckpt")
    export_weights(str(tmp_path / "last.ckpt"))
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "last.yaml")) == config
    loaded, _ = instantiate_from_checkpoint(tmp_path / "last.safetensors", config=config)
    assert_same_weights(loaded, model)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_unreadable_file_error_says_what_works(tmp_path):
    """A file the readers refuse is named, with what the project reads; nothing of it runs."""
    net = torch.nn.Linear(2, 2)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(net), path)
    with pytest.raises(CheckpointError, match="reads tensors and plain containers only") as e:
        load_state_dict(path)
    assert str(path) in str(e.value)
    with pytest.raises(SystemExit, match="reads tensors and plain containers only"):
        export_weights(str(path), "--out", str(tmp_path / "plain"))
    assert not (tmp_path / "plain.safetensors").exists()
