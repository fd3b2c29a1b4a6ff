"""The prior base beyond class-labelled tokens: continuous latents (KL posterior, VQ pre-quantisation),
the latent scale factor, several networks with their own EMA copies, and conditioning objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ldm.conditioning import ClassLabel, Combined, ConcatImage, Text, Unconditional, cat_cond
from ldm.data.skipped import Skipped, collate_good
from ldm.prior import LatentPrior
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "test"


def first_stage_config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / name).model, resolve=True)


class TwoNetGaussianPrior(LatentPrior):
    """A test double: x0-regression of noised latents by two small conv nets (one per noise level),
    enough to drive the base's continuous paths; not a model anyone should train."""

    latent_kind = "continuous"
    network_names = ("low", "high")

    def __init__(self, first_stage_config, **kw):
        super().__init__(first_stage_config, **kw)
        c = self.latent_shape[0]
        self.low, self.high = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.finish_init()

    def compute_loss(self, latents, cond, generator=None, ema=False):
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        low, high = self.network("low", ema), self.network("high", ema)
        loss = (low(latents + 0.1 * noise) - latents).pow(2).mean() + (high(latents + noise) - latents).pow(2).mean()
        return loss, {}

    def sample_latents(self, n, cond, generator, ema=True, **kw):
        z = torch.randn((n, *self.latent_shape), generator=generator)
        return self.network("low", ema)(self.network("high", ema)(z))


class Images(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(1, 32, 32, generator=g) * 2 - 1, "class_label": i % 10}


def test_kl_posterior_is_sampled_or_its_mode_taken():
    prior = TwoNetGaussianPrior(first_stage_config("first_stage_kl.yaml"), scale_factor=0.5)
    assert prior.latent_shape == (4, 16, 16)
    batch = {"image": torch.stack([Images()[i]["image"] for i in range(2)])}
    enc = prior.first_stage_model.encode_for_prior(batch["image"])
    mode = prior.get_latents(batch, mode=True)
    torch.testing.assert_close(mode, 0.5 * enc["posterior_mean"])
    a = prior.get_latents(batch, generator=torch.Generator().manual_seed(0))
    b = prior.get_latents(batch, generator=torch.Generator().manual_seed(0))
    c = prior.get_latents(batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    eps = torch.randn(mode.shape, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * (enc["posterior_mean"] + torch.exp(0.5 * enc["posterior_logvar"]) * eps)
    torch.testing.assert_close(a, expected)
    # a cached posterior gives the same latents as encoding the images
    cached = {"posterior_mean": enc["posterior_mean"], "posterior_logvar": enc["posterior_logvar"]}
    assert torch.equal(prior.get_latents(cached, generator=torch.Generator().manual_seed(0)), a)
    # decode undoes the scale
    torch.testing.assert_close(prior.decode(mode), prior.first_stage_model.decode(enc["posterior_mean"]).clamp(-1, 1))


def test_vq_hands_a_continuous_prior_its_pre_quantisation_latents():
    prior = TwoNetGaussianPrior(first_stage_config("first_stage_vq.yaml"))
    fs = prior.first_stage_model
    x = Images()[0]["image"][None]
    z = prior.encode(x)
    torch.testing.assert_close(z, fs.quant_conv(fs.encoder(x)))
    assert z.shape == (1, *prior.latent_shape) == (1, 16, 16, 16)
    # decoding quantises first: the same image as decoding the tokens
    torch.testing.assert_close(prior.decode(z), fs.decode_indices(fs.encode_to_indices(x)).clamp(-1, 1))


def fit(prior, tmp_path, steps=2, ckpt_path=None):
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         limit_val_batches=0, default_root_dir=str(tmp_path), enable_checkpointing=False)
    trainer.fit(prior, DataLoader(Images(), batch_size=4), ckpt_path=ckpt_path, weights_only=True)
    return trainer


def test_scale_by_std_is_estimated_once_and_kept_in_the_checkpoint(tmp_path):
    cfg = first_stage_config("first_stage_kl.yaml")
    prior = TwoNetGaussianPrior(cfg, scale_by_std=True)
    trainer = fit(prior, tmp_path)
    first = Images()
    images = torch.stack([first[i]["image"] for i in range(4)])  # the first batch (no shuffling)
    enc = prior.first_stage_model.encode_for_prior(images)
    z = enc["posterior_mean"] + torch.exp(0.5 * enc["posterior_logvar"]) * torch.randn(
        enc["posterior_mean"].shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.scale_factor, 1.0 / z.flatten().std(correction=0), rtol=1e-4, atol=0)
    assert "scale_factor" in prior.state_dict()
    path = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(path)
    resumed = TwoNetGaussianPrior(cfg, scale_by_std=True)
    fit(resumed, tmp_path, steps=3, ckpt_path=str(path))  # a resumed run keeps the estimate
    assert torch.equal(resumed.scale_factor, prior.scale_factor)


class FirstBatchUnreadable(Images):
    def __getitem__(self, i):
        return Skipped("unreadable", f"image {i}") if i < 4 else super().__getitem__(i)


def test_scale_by_std_is_estimated_on_the_first_batch_with_images(tmp_path):
    """A batch of unreadable images only is None, which Lightning passes over without the batch hooks."""
    prior = TwoNetGaussianPrior(first_stage_config("first_stage_kl.yaml"), scale_by_std=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         limit_val_batches=0, default_root_dir=str(tmp_path), enable_checkpointing=False)
    trainer.fit(prior, DataLoader(FirstBatchUnreadable(), batch_size=4, collate_fn=collate_good))
    images = torch.stack([Images()[i]["image"] for i in range(4, 8)])  # the second batch
    enc = prior.first_stage_model.encode_for_prior(images)
    z = enc["posterior_mean"] + torch.exp(0.5 * enc["posterior_logvar"]) * torch.randn(
        enc["posterior_mean"].shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.scale_factor, 1.0 / z.flatten().std(correction=0), rtol=1e-4, atol=0)


def test_each_network_has_its_own_ema_copy(tmp_path):
    prior = TwoNetGaussianPrior(first_stage_config("first_stage_kl.yaml"), ema_decay=0.5)
    keys = prior.state_dict().keys()
    assert {"low_ema.weight", "low_ema.bias", "high_ema.weight", "high_ema.decay", "high_ema.num_updates"} <= set(keys)
    fit(prior, tmp_path, steps=3)
    for name in ("low", "high"):
        ema = getattr(prior, f"{name}_ema")
        assert int(ema.num_updates) == 3
        assert not torch.equal(ema.averaged.weight, getattr(prior, name).weight)
        assert prior.network(name, ema=True) is ema.averaged and prior.network(name) is getattr(prior, name)
    a = prior.sample(2, generator=torch.Generator().manual_seed(0))
    b = prior.sample(2, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert not torch.equal(a, b)


def test_conditioner_from_config_and_the_class_shorthand():
    cfg = first_stage_config("first_stage_kl.yaml")
    assert isinstance(TwoNetGaussianPrior(cfg).conditioner, Unconditional)
    assert TwoNetGaussianPrior(cfg, num_classes=10).num_classes == 10
    combined = {"target": "ldm.conditioning.Combined", "params": {"conditioners": {
        "label": {"target": "ldm.conditioning.ClassLabel", "params": {"num_classes": 3}},
        "lowres": {"target": "ldm.conditioning.ConcatImage", "params": {"shape": [1, 8, 8]}}}}}
    prior = TwoNetGaussianPrior(cfg, conditioner_config=combined)
    assert prior.conditioner.keys == ("class_label", "concat") and prior.num_classes == 3
    with pytest.raises(ValueError, match="either conditioner_config or num_classes"):
        TwoNetGaussianPrior(cfg, conditioner_config=combined, num_classes=3)
    with pytest.raises(ValueError, match=r"must build an ldm.conditioning.Conditioner"):
        TwoNetGaussianPrior(cfg, conditioner_config={"target": "torch.nn.Identity"})


def test_class_label_conditioner():
    c = ClassLabel(3)
    assert torch.equal(c.encode({"class_label": [0, 2]})["class_label"], torch.tensor([0, 2]))
    assert torch.equal(c.null(2)["class_label"], torch.tensor([3, 3]))
    assert torch.equal(c.from_user(1, 3)["class_label"], torch.tensor([1, 1, 1]))
    assert torch.equal(c.from_user(None, 2)["class_label"], torch.tensor([3, 3]))  # None is the null class
    for bad in ([0, 3 + 1], [0.5, 1.0], "cat"):
        with pytest.raises(ValueError, match=r"cond must be .*class label"):
            c.from_user(bad, 2)
    dropped = c.drop({"class_label": torch.zeros(1000, dtype=torch.long)}, 0.3, torch.Generator().manual_seed(0))
    frac = (dropped["class_label"] == 3).float().mean()
    assert 0.25 < frac < 0.35 and set(dropped["class_label"].tolist()) == {0, 3}
    assert torch.equal(c.drop({"class_label": torch.zeros(4, dtype=torch.long)}, 0.0)["class_label"], torch.zeros(4).long())


def test_text_conditioner_pads_validates_and_has_an_empty_null():
    t = Text(max_length=5, kind="embeddings", dim=3)
    cond = t.from_user({"context": torch.ones(2, 4, 3), "context_mask": torch.ones(2, 4, dtype=torch.bool)}, 2)
    assert cond["context"].shape == (2, 5, 3) and cond["context_mask"].tolist() == [[True] * 4 + [False]] * 2
    assert not t.null(2)["context_mask"].any()
    with pytest.raises(ValueError, match=r"cond must be .*embeddings \(n, L, 3\)"):
        t.from_user({"context": torch.ones(2, 6, 3), "context_mask": torch.ones(2, 6, dtype=torch.bool)}, 2)
    with pytest.raises(ValueError, match="missing \\['context_mask'\\]"):
        t.from_user({"context": torch.ones(2, 4, 3)}, 2)
    ids = Text(max_length=4, kind="ids", vocab_size=10, key="caption")
    enc = ids.encode({"caption": torch.tensor([[1, 2], [3, 4]])})
    assert enc["context"].tolist() == [[1, 2, 0, 0], [3, 4, 0, 0]]
    with pytest.raises(ValueError, match="token ids must be in 0..9"):
        ids.from_user({"context": torch.tensor([[11]]), "context_mask": torch.tensor([[True]])}, 1)
    dropped = t.drop(cond, 0.999999, torch.Generator().manual_seed(0))
    assert not dropped["context_mask"].any() and not dropped["context"].any()


def test_concat_and_combined_conditioning_travel_together():
    combo = Combined({"label": {"target": "ldm.conditioning.ClassLabel", "params": {"num_classes": 2}},
                      "lowres": {"target": "ldm.conditioning.ConcatImage", "params": {"shape": [1, 4, 4]}}})
    batch = {"class_label": torch.tensor([0, 1, 1, 0, 0, 1, 0, 1]), "lr_image": torch.ones(8, 1, 4, 4)}
    cond = combo.encode(batch)
    dropped = combo.drop(cond, 0.5, torch.Generator().manual_seed(3))
    nulled = dropped["class_label"] == 2
    assert nulled.any() and not nulled.all()
    assert torch.equal(dropped["concat"].flatten(1).any(1), ~nulled)  # one mask drops both together
    both = cat_cond(cond, combo.null(8))
    assert both["class_label"].tolist() == batch["class_label"].tolist() + [2] * 8
    assert both["concat"].shape == (16, 1, 4, 4)
    with pytest.raises(ValueError, match=r"an image batch \(n, 1, 4, 4\)"):
        ConcatImage([1, 4, 4]).from_user(torch.ones(3, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="unconditional: pass cond=None"):
        Unconditional().from_user([1], 1)


def test_unconditional_instantiation_from_config():
    cond = instantiate_from_config({"target": "ldm.conditioning.Unconditional"})
    assert cond.encode({"image": torch.zeros(1)}) == {} and cond.null(3) == {}


def test_learning_rate_schedule_is_taming_warmup_cosine():
    """Warm-up then cosine decay: after the warm-up the rate is taming-transformers' LambdaWarmUpCosineScheduler's
    (the independent oracle; ImageBART's configs use it); the warm-up reaches each rate one step earlier than it
    (the first step already trains at lr_start + a step)."""
    from taming.lr_scheduler import LambdaWarmUpCosineScheduler

    kw = dict(warmup_steps=10, warmup_start_lr=2.5e-6, lr_decay_steps=100, min_lr=1e-8)
    prior = TwoNetGaussianPrior(first_stage_config("first_stage_kl.yaml"), **kw)
    prior.learning_rate = 1e-4
    oracle = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=1e-8, lr_max=1e-4, lr_start=2.5e-6,
                                         max_decay_steps=100)
    ours = [prior.learning_rate * prior.lr_factor(n) for n in range(130)]
    theirs = [float(oracle.schedule(n)) for n in range(130)]
    assert ours[10:] == pytest.approx(theirs[10:], rel=1e-9, abs=1e-15)
    assert ours[:9] == pytest.approx(theirs[1:10], rel=1e-9)
    assert ours[-1] == pytest.approx(1e-8) and max(ours) == pytest.approx(1e-4)
    plain = TwoNetGaussianPrior(first_stage_config("first_stage_kl.yaml"), warmup_steps=4)
    assert [plain.lr_factor(n) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
