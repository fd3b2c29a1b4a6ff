"""The optimizers every model builds: fused where the device has the kernel, the same update as the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.optim import adam, adamw
from tests.toy import build_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "test"


def trained(fused: bool, cls=adamw, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    opt = cls(net.parameters(), fused, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("cls", [adamw, adam])
def test_fused_update_equals_the_loop(cls):
    for a, b in zip(trained(True, cls), trained(False, cls)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_where_available_and_refused_where_not():
    params = [nn.Parameter(torch.zeros(3))]
    assert adamw(params).defaults["fused"] is True  # the CPU has the kernel in this torch
    assert not adamw(params, fused=False).defaults["fused"]
    with pytest.raises(ValueError, match="fused_optimizer: true needs every parameter on a device with a fused "
                                         "AdamW"):
        adamw([nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)], fused=True)


def test_prior_builds_its_training_optimizer_from_config():
    prior = build_from_config(CONFIGS / "absorbing.yaml")
    opt = prior.build_optimizer()
    assert opt.defaults["fused"] is True
    assert opt.defaults["lr"] == prior.learning_rate
    assert sum(p.numel() for group in opt.param_groups for p in group["params"]) == \
        sum(p.numel() for p in prior.trained_parameters())
    unfused = build_from_config(CONFIGS / "absorbing.yaml", **{"model.params.fused_optimizer": False})
    assert not unfused.build_optimizer().defaults["fused"]
