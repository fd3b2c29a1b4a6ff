"""The latent-diffusion model-zoo first stages: same parameter names, shapes and counts as the same
configs built from taming-transformers' modules (so the released checkpoints load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "first_stage"
ZOO = ["vq-f4", "vq-f8", "vq-f16", "kl-f4", "kl-f8", "kl-f16", "kl-f32"]


def reference_layout(cfg) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the inference part of the anchors' model, built from taming's modules."""
    dd = OmegaConf.to_container(cfg.ddconfig)
    z, e = dd["z_channels"], cfg.embed_dim
    kl = dd["double_z"]
    parts = {"encoder.": taming_model.Encoder(**dd), "decoder.": taming_model.Decoder(**dd),
             "quant_conv.": torch.nn.Conv2d(2 * z if kl else z, 2 * e if kl else e, 1),
             "post_quant_conv.": torch.nn.Conv2d(e, z, 1)}
    if not kl:
        parts["quantize."] = torch.nn.Module()
        parts["quantize."].embedding = torch.nn.Embedding(cfg.n_embed, e)
    return {p + k: tuple(v.shape) for p, m in parts.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_layout_matches_anchor(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.model.params.lossconfig.params.perceptual_weight = 0.0  # no VGG download in the test
    with torch.device("meta"):
        ours = instantiate_from_config(cfg.model, key="model")
        ref = reference_layout(cfg.model.params)
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not k.startswith("loss.")}
    assert mine == ref
    count = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("loss."))
    assert count == sum(torch.Size(s).numel() for s in ref.values())
