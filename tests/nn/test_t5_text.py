"""Imagen's frozen T5 text encoder (`T5EncoderModel` through ldm.nn.hf_text) feeding the UNet's cross-attention
and pooled embedding, on a tiny randomly initialised T5 saved locally; a hub name that cannot load offline says
so and names the byte-level alternative. Nothing downloads (tests/nn/conftest.py sets HF_HUB_OFFLINE)."""

from __future__ import annotations

import pytest
import torch

from ldm.conditioning import HFCaption
from ldm.nn.unet import UNetModel

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from ldm.nn.hf_text import T5_V1_1, FrozenHFTextEncoder  # noqa: E402
from tests.nn.test_hf_text import WORDS, save_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5_tiny")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                   feed_forward_proj="gated-gelu")  # T5 v1.1's feed-forward, as T5-XXL's
    transformers.T5EncoderModel(config).save_pretrained(path)
    save_tokenizer(path, "$A </s>")
    return str(path)


def test_a_hub_name_that_cannot_load_offline_names_the_offline_alternative():
    for build in (lambda: FrozenHFTextEncoder("t5", "google/t5-v1_1-xl"),
                  lambda: HFCaption("google/t5-v1_1-xl").encode({"caption": ["a cat"]})):
        with pytest.raises(ValueError) as info:
            build()
        message = str(info.value)
        assert "'google/t5-v1_1-xl'" in message and "the hub cannot be reached (offline, or HF_HUB_OFFLINE=1)" in message
        assert "ldm.nn.text.ByteTextEncoder" in message and "ldm.conditioning.Caption" in message


def test_the_meta_device_builds_t5_v1_1_from_its_shape_without_weights(t5_dir):
    """Config checks and parameter counts build on the meta device, where from_pretrained refuses to run."""
    with torch.device("meta"):
        xl = FrozenHFTextEncoder("t5", "google/t5-v1_1-xl", dtype="bfloat16")
        local = FrozenHFTextEncoder("t5", t5_dir)
    assert xl.dim == T5_V1_1["xl"][0] == 2048 and next(xl.parameters()).is_meta
    assert sum(p.numel() for p in xl.parameters()) == 1_223_527_424  # t5-v1_1-xl's encoder
    assert local.dim == 32 and local.vocab_size == len(WORDS)


def test_t5_embeddings_and_mask_reach_the_unets_cross_attention_and_pooling(t5_dir):
    """Padding is masked end to end: more of it leaves the UNet output unchanged; the text changes it."""
    enc = FrozenHFTextEncoder("t5", t5_dir, max_length=12)
    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                     num_res_blocks=[1, 2], attention_resolutions=(2,), num_heads=2, use_spatial_transformer=True,
                     context_dim=enc.dim, pooled_context=True, efficient_updown=True, scale_skip_connection=True)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # past the zero-initialised outputs
    unet.eval()
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 500])

    def run(max_length, captions):
        cond = enc.condition(HFCaption(t5_dir, max_length=max_length).encode({"caption": captions}))
        assert cond["context"].shape == (2, max_length, 32) and cond["context_mask"].dtype == torch.bool
        with torch.no_grad():
            return unet(x, t, context=cond["context"], context_mask=cond["context_mask"])

    out = run(8, ["a photo of a cat", "a dog"])
    torch.testing.assert_close(run(12, ["a photo of a cat", "a dog"]), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(8, ["a photo of a bag", "a dog"])[0], out[0], atol=1e-4)
