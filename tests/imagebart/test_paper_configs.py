"""The paper's ImageBART configurations build on the meta device with the original networks' parameter counts,
computed in closed form from the original configurations (CompVis/imagebart configs/*)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from imagebart.transformer import gpt_parameter_count, parameter_count, xtransformer_parameter_count
from ldm.checkpoint import _without_ckpt_paths
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagebart"

# the original configurations: (XTransformer params, scalors?, GPT params), from configs/<setup>/*-scale<k>.yaml
ORIGINAL = {
    "ffhq_4scales_geometric": (dict(dim=752, enc_num_tokens=548, enc_depth=18, enc_heads=16, enc_max_seq_len=257,
                                    dec_num_tokens=548, dec_depth=6, dec_heads=16, dec_max_seq_len=256), 4,
                               dict(vocab_size=548, block_size=256, n_layer=26, n_embd=800)),
    "ffhq_2scales_custom": (dict(dim=1152, enc_num_tokens=548, enc_depth=32, enc_heads=16, enc_max_seq_len=257,
                                 dec_num_tokens=548, dec_depth=6, dec_heads=16, dec_max_seq_len=256), 0,
                            dict(vocab_size=548, block_size=256, n_layer=36, n_embd=1216)),
    "lsun_churches": (dict(dim=1152, enc_num_tokens=1022, enc_depth=32, enc_heads=16, enc_max_seq_len=258,
                           dec_num_tokens=1022, dec_depth=6, dec_heads=16, dec_max_seq_len=256), 0,
                      dict(input_vocab_size=1022, vocab_size=1022, block_size=256, n_layer=36, n_embd=1216)),
    "lsun_bedrooms": (dict(dim=1152, enc_num_tokens=1017, enc_depth=32, enc_heads=16, enc_max_seq_len=257,
                           dec_num_tokens=1017, dec_depth=6, dec_heads=16, dec_max_seq_len=256), 0,
                      dict(input_vocab_size=1017, vocab_size=1017, block_size=256, n_layer=36, n_embd=1216)),
    "lsun_cats": (dict(dim=1152, enc_num_tokens=1014, enc_depth=32, enc_heads=16, enc_max_seq_len=257,
                       dec_num_tokens=1014, dec_depth=6, dec_heads=16, dec_max_seq_len=256), 0,
                  dict(input_vocab_size=1014, vocab_size=1014, block_size=256, n_layer=36, n_embd=1216)),
    "imagenet_4scales_geometric": (dict(dim=1152, enc_num_tokens=1000, enc_depth=32, enc_heads=16, enc_max_seq_len=258,
                                        dec_num_tokens=973, dec_depth=6, dec_heads=16, dec_max_seq_len=256), 4,
                                   dict(input_vocab_size=1000, vocab_size=973, block_size=258, n_layer=36, n_embd=1216)),
    "imagenet_5scales_custom": (dict(dim=1152, enc_num_tokens=1000, enc_depth=32, enc_heads=16, enc_max_seq_len=258,
                                     dec_num_tokens=973, dec_depth=6, dec_heads=16, dec_max_seq_len=256), 0,
                                dict(input_vocab_size=1000, vocab_size=973, block_size=258, n_layer=36, n_embd=1216)),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_paper_config_has_the_original_parameter_counts(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=True)
    with torch.device("meta"):
        prior = instantiate_from_config(_without_ckpt_paths(cfg["model"]), key="model")
    xt, scalors, gpt = ORIGINAL[name]
    # the original encoder carries a logits head it never uses (return_embeddings=True); this one has none
    unused_head = xt["dim"] * xt["enc_num_tokens"] + xt["enc_num_tokens"]
    expected_model = xtransformer_parameter_count(**xt, scalors=scalors) - unused_head
    assert parameter_count(prior.model) == expected_model
    assert parameter_count(prior.top) == gpt_parameter_count(**gpt)
    print(f"{name}: transitions {parameter_count(prior.model):,}, last scale {parameter_count(prior.top):,}")


def test_closed_form_counts_match_the_fixture_network():
    """The closed form is checked once against a real state dict: the fixture's original XTransformer."""
    from tests.imagebart.test_transformer import original_fixture

    config, state, _ = original_fixture()
    kw = config["init_kwargs"]["transformer_config"]["params"]
    keys = ("dim", "enc_num_tokens", "enc_depth", "enc_heads", "enc_max_seq_len", "dec_num_tokens", "dec_depth",
            "dec_heads", "dec_max_seq_len")
    stored = sum(v.numel() for k, v in state.items() if k.startswith("transformer."))
    assert xtransformer_parameter_count(**{k: kw[k] for k in keys}, scalors=kw["n_scales"]) == stored


def test_gpt_closed_form_matches_taming_mingpt():
    from tests.imagebart.test_transformer import import_mingpt

    mingpt = import_mingpt()
    gpt = mingpt.GPT(vocab_size=20, block_size=9, n_layer=2, n_head=2, n_embd=16)
    assert gpt_parameter_count(vocab_size=20, block_size=9, n_layer=2, n_embd=16) == \
        sum(p.numel() for p in gpt.parameters())
