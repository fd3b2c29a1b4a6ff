from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, load_into, load_state_dict, read_checkpoint
from ldm.ema import EMA


def test_lightning_ckpt_and_prefix(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in net.state_dict().items()}, "global_step": 5}, path)
    sd = load_state_dict(path, prefix="first_stage_model.")
    assert set(sd) == {"0.weight", "0.bias"}
    other = torch.nn.Sequential(torch.nn.Linear(2, 3))
    load_into(other, sd)
    assert torch.equal(other[0].weight, net[0].weight)


def test_never_runs_pickled_code(tmp_path, capsys):
    """A plain pickle (not torch.save) is refused without running what it names."""
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="not written by torch.save"):
        read_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_sharded_safetensors(tmp_path):
    a, b = {"x": torch.ones(2)}, {"y": torch.zeros(3)}
    save_file(a, tmp_path / "s-1.safetensors")
    save_file(b, tmp_path / "s-2.safetensors")
    (tmp_path / "s.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"key_order": ["y", "x"]}, "weight_map": {"x": "s-1.safetensors", "y": "s-2.safetensors"}}))
    sd = load_state_dict(tmp_path)
    assert list(sd) == ["y", "x"]


def test_mismatch_names_keys_and_shapes(tmp_path):
    net = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointError) as e:
        load_into(net, {"weight": torch.zeros(4, 2), "extra": torch.zeros(1)}, source="x.ckpt")
    msg = str(e.value)
    assert "weight: (4, 2) in x.ckpt, (3, 2) in Linear" in msg
    assert "missing key(s): bias" in msg and "unexpected key(s): extra" in msg
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state_dict(tmp_path / "nope.ckpt")


def test_allowed_missing_keys_may_differ_in_shape():
    """A first stage's discriminator (``loss.``) may be sized differently from the checkpoint's."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 5))
    state = {"0.weight": torch.ones(3, 2), "0.bias": torch.ones(3), "1.weight": torch.ones(4, 3),
             "1.bias": torch.ones(4)}
    before = net[1].weight.detach().clone()
    load_into(net, state, allow_missing=("1.",))
    assert torch.equal(net[0].weight, torch.ones(3, 2)) and torch.equal(net[1].weight, before)
    with pytest.raises(CheckpointError, match=r"1.weight: \(4, 3\) in checkpoint, \(5, 3\)"):
        load_into(net, state)


def test_ema_closed_form_copy_and_litema_layout():
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False))
    net.register_buffer("stat", torch.zeros(1))
    with torch.no_grad():
        net[0].weight.fill_(0.0)
    ema = EMA(net, decay=0.5, warmup=False)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net.stat.fill_(3.0)
    ema.update(net)
    ema.update(net)  # 0 -> 0.5 -> 0.75
    assert ema.averaged[0].weight.item() == pytest.approx(0.75) and net[0].weight.item() == 1.0
    assert ema.averaged.stat.item() == 3.0  # buffers follow the live network
    assert ema(torch.ones(1, 1)).item() == pytest.approx(0.75)  # the copy runs, nothing is swapped
    assert list(ema.state_dict()) == ["decay", "num_updates", "0weight"]  # latent-diffusion's LitEma keys
    assert not list(ema.parameters()) and not ema.averaged[0].weight.requires_grad
    fresh = EMA(net, decay=0.5, warmup=False)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.averaged[0].weight.item() == pytest.approx(0.75)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({"decay": torch.tensor(0.5), "num_updates": torch.tensor(-1)})


def test_ema_warmup_decay():
    net = torch.nn.Linear(1, 1)
    ema = EMA(net, decay=0.999)
    for n in range(1, 4):
        ema.update(net)
        assert ema.current_decay() == pytest.approx((1 + n) / (10 + n))
