"""Frozen T5 / CLIP text encoders from `transformers`: tiny randomly initialised models and word-level tokenizers
are saved into a temporary folder and loaded back through the same `from_pretrained` calls a user's hub name
takes; nothing downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.conditioning import HFCaption
from ldm.util import ConfigError, instantiate_from_config

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ldm.nn.hf_text import FrozenHFTextEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["<pad>", "</s>", "<unk>", "<s>", "a", "photo", "of", "cat", "dog", "sandal", "bag"]


def save_tokenizer(path: Path, template: str) -> None:
    """A word-level tokenizer over WORDS that adds T5's `</s>` (or CLIP's `<s>` ... `</s>`) and pads with `<pad>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 3), ("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                            unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(WORDS), d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64,
                                   dropout_rate=0.5)  # dropout that would show if the encoder ever trained
    transformers.T5EncoderModel(config).save_pretrained(path)
    save_tokenizer(path, "$A </s>")
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(WORDS), hidden_size=24, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                         pad_token_id=0, bos_token_id=3, eos_token_id=1)
    transformers.CLIPTextModel(config).save_pretrained(path)
    save_tokenizer(path, "<s> $A </s>")
    return str(path)


def test_a_bad_kind_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match=r"kind must be one of 't5', 'clip' \(a T5 encoder or a CLIP text model\), "
                                         r"got 'bert'"):
        FrozenHFTextEncoder("bert", "no/such-model")
    with pytest.raises(ConfigError, match=r"cond_stage_config\.params\.kind"):
        instantiate_from_config({"target": "ldm.nn.hf_text.FrozenHFTextEncoder",
                                 "params": {"kind": "gpt", "name": "no/such-model"}}, key="cond_stage_config")


def test_a_folder_without_the_models_files_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"name: cannot load the t5 text encoder '.*' \(T5EncoderModel\.from_pretrained\)"):
        FrozenHFTextEncoder("t5", str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot load the tokenizer '.*' of HFCaption|tokenizer '.*' of HFCaption has no"):
        HFCaption(str(tmp_path)).encode({"caption": ["a cat"]})


def test_t5_encoder_gives_the_models_hidden_states_and_masks_padding(t5_dir):
    cap = HFCaption(t5_dir, max_length=8)
    enc = FrozenHFTextEncoder("t5", t5_dir, max_length=8)
    assert enc.dim == 32 and enc.use_mask
    cond = cap.encode({"caption": ["a photo of a cat", "a dog"]})
    assert cond["context"].tolist() == [[4, 5, 6, 4, 7, 1, 0, 0], [4, 8, 1, 0, 0, 0, 0, 0]]  # ... </s> <pad>
    assert cond["context_mask"].tolist() == [[True] * 6 + [False] * 2, [True] * 3 + [False] * 5]
    out = enc.condition(cond)
    assert out["context"].shape == (2, 8, 32) and out["context"].dtype == torch.float32
    assert torch.equal(out["context_mask"], cond["context_mask"])  # padding stays out of the UNet's attention
    reference = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    with torch.no_grad():
        want = reference(input_ids=cond["context"], attention_mask=cond["context_mask"].long()).last_hidden_state
    torch.testing.assert_close(out["context"], want)
    # more padding changes nothing where there are tokens: the mask keeps it out of the encoder
    longer = FrozenHFTextEncoder("t5", t5_dir, max_length=12)
    wide = HFCaption(t5_dir, max_length=12).encode({"caption": ["a photo of a cat", "a dog"]})
    torch.testing.assert_close(longer.condition(wide)["context"][:, :8][cond["context_mask"]],
                               out["context"][cond["context_mask"]], atol=1e-5, rtol=0)
    null = cap.null(2)  # the tokenized empty caption: </s> alone
    assert null["context"].tolist() == [[1] + [0] * 7] * 2 and null["context_mask"][:, 0].all()
    with pytest.raises(ValueError, match=r"token ids outside the 11 of .*: is the conditioner's tokenizer this "
                                         r"encoder's"):
        enc(torch.full((1, 4), 50), torch.ones(1, 4, dtype=torch.bool))


def test_clip_encoder_attends_to_every_position_as_stable_diffusion(clip_dir):
    cap = HFCaption(clip_dir, max_length=10)
    enc = FrozenHFTextEncoder("clip", clip_dir, max_length=10)
    assert enc.dim == 24 and not enc.use_mask
    cond = cap.encode({"caption": ["a photo of a bag"]})
    assert cond["context"][0, :7].tolist() == [3, 4, 5, 6, 4, 10, 1]  # <s> ... </s>
    out = enc.condition(cond)
    assert out["context"].shape == (1, 10, 24) and out["context_mask"].all()
    reference = transformers.CLIPTextModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(out["context"], reference(input_ids=cond["context"]).last_hidden_state)
    with pytest.raises(ValueError, match=r"max_length 20 is more than the 16 positions of the CLIP text model"):
        FrozenHFTextEncoder("clip", clip_dir, max_length=20)


def test_the_encoder_is_frozen_and_never_trains(t5_dir):
    enc = FrozenHFTextEncoder("t5", t5_dir, max_length=8)
    cond = HFCaption(t5_dir, max_length=8).encode({"caption": ["a photo of a sandal"]})
    before = enc.condition(cond)["context"]
    enc.train()  # the prior's train mode: the encoder's dropout (0.5 here) stays off
    assert not enc.encoder.training and not any(p.requires_grad for p in enc.parameters())
    after = enc.condition(cond)["context"]
    assert torch.equal(before, after) and not after.requires_grad


def test_a_prior_step_leaves_the_frozen_encoder_unchanged(t5_dir):
    """A tiny text-to-image prior on the T5 encoder: an optimizer step moves the UNet and not the encoder, its EMA
    copy shares the encoder, and the state dict carries it (as the frozen first stage) and loads back."""
    cfg = OmegaConf.load(ROOT / "configs" / "test" / "ldm_text.yaml")
    cfg.model.params.conditioner_config = {"target": "ldm.conditioning.HFCaption",
                                           "params": {"name": t5_dir, "max_length": 8}}
    cfg.model.params.cond_stage_config = {"target": "ldm.nn.hf_text.FrozenHFTextEncoder",
                                          "params": {"kind": "t5", "name": t5_dir, "max_length": 8}}
    torch.manual_seed(0)
    prior = instantiate_from_config(cfg.model, key="model").train()
    assert not prior.cond_stage_model.encoder.training
    encoder = {k: v.clone() for k, v in prior.cond_stage_model.state_dict().items()}
    unet = {k: v.clone() for k, v in prior.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    opt = prior.configure_optimizers()
    cond = prior.conditioner.drop(prior.conditioner.encode({"caption": ["a photo of a cat", "a bag"]}), 0.5, g)
    loss, _ = prior.compute_loss(torch.randn(2, *prior.latent_shape, generator=g), cond, generator=g)
    loss.backward()
    opt.step()
    prior.update_ema()
    assert all(torch.equal(v, encoder[k]) for k, v in prior.cond_stage_model.state_dict().items())
    assert not all(torch.equal(v, unet[k]) for k, v in prior.model.state_dict().items())
    assert prior.cond_stage_model_ema.averaged.encoder is prior.cond_stage_model.encoder
    state = prior.state_dict()
    assert any(k.startswith("cond_stage_model.encoder.") for k in state)
    assert not any(k.startswith("cond_stage_model_ema.") and "encoder" in k for k in state)
    torch.manual_seed(1)
    again = instantiate_from_config(cfg.model, key="model")
    again.load_state_dict(state, strict=True)
    images = again.eval().sample(2, cond="a dog", guidance_scale=2.0, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()
