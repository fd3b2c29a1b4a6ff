"""The first stage's two-optimizer GAN step under each precision the CPU offers.

Both the autoencoder and the discriminator step must go through Lightning's precision plugin
(autocast, the grad scaler of 16-mixed), while `global_step` counts batches, not optimizer steps.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.plugins.precision import MixedPrecision

from ldm.util import instantiate_from_config

CONFIGS = ("configs/test/first_stage_vq.yaml", "configs/test/first_stage_kl.yaml")
# On CPU, Lightning 2 turns `precision="16-mixed"` into bf16-mixed (with a warning); torch itself has
# float16 autocast and a GradScaler on CPU, so "16-mixed" here passes Lightning's MixedPrecision plugin
# for the CPU explicitly: the grad-scaler path the raw discriminator step used to bypass.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
BATCHES = 2


def _build(config: str):
    cfg = OmegaConf.load(config)
    cfg.model.params.lossconfig.params.disc_start = 0  # the discriminator steps from the first batch
    cfg.data.params.batch_size = 2
    cfg.data.params.train.params.limit = 2 * BATCHES
    pl.seed_everything(0)
    model = instantiate_from_config(cfg.model, key="model")
    model.learning_rate = 1e-3
    return model, instantiate_from_config(cfg.data, key="data")


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _changed(before: list[torch.Tensor], params) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("config", CONFIGS)
def test_gan_step_through_the_precision_plugin(config, precision, monkeypatch):
    model, data = _build(config)
    if precision == "16-mixed":
        # a modest initial scale: the KL loss sums over pixels (gradients up to ~750), so from the
        # default 2**16 the scaler skips the first steps (inf gradients in float16, halving the scale)
        # and two batches would never step
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        kwargs = {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=scaler)]}
    else:
        kwargs = {"precision": precision}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=BATCHES, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kwargs)
    plugin = trainer.precision_plugin
    assert plugin.precision == precision
    if precision == "16-mixed":
        assert plugin.scaler is not None  # the loss scaling the raw optimizer step used to bypass
    steps: list[str] = []
    inner = plugin.optimizer_step

    def counting_step(optimizer, model, closure, **kwargs):
        steps.append("disc" if optimizer is disc_opt() else "ae")
        return inner(optimizer, model=model, closure=closure, **kwargs)

    def disc_opt():
        return trainer.optimizers[1]

    monkeypatch.setattr(plugin, "optimizer_step", counting_step)
    ae_params = list(model.autoencoder_parameters())
    disc_params = list(model.loss.discriminator.parameters())
    ae_before, disc_before = _snapshot(ae_params), _snapshot(disc_params)

    trainer.fit(model, datamodule=data)

    assert trainer.global_step == BATCHES  # one per batch, though each batch steps two optimizers
    assert steps == ["ae", "disc"] * BATCHES  # both through the precision plugin
    metrics = trainer.callback_metrics
    for key in ("train/total_loss", "train/rec_loss", "train/disc_loss", "train/g_loss"):
        assert torch.isfinite(metrics[key]), (key, metrics[key])
    assert _changed(ae_before, ae_params), "the autoencoder did not step"
    assert _changed(disc_before, disc_params), "the discriminator did not step"
    states = [trainer.optimizers[i].state_dict()["state"] for i in (0, 1)]
    # Adam's own step count: with 16-mixed, a step the scaler skips (inf gradients) is not counted
    expected = [BATCHES] if precision != "16-mixed" else list(range(1, BATCHES + 1))
    for state in states:
        assert {int(s["step"]) for s in state.values()} <= set(expected) and state


def test_16_mixed_by_name_on_cpu_is_bf16():
    """What `--precision 16-mixed` gives on a CPU: Lightning's bf16-mixed, not float16 with a scaler."""
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = pl.Trainer(accelerator="cpu", devices=1, precision="16-mixed", logger=False)
    assert trainer.precision_plugin.precision == "bf16-mixed"
