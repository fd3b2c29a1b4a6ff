"""latent-diffusion's BERTEmbedder: its checkpoint's key layout, its forward against x-transformers (the installed
release, given the 0.x release's biased LayerNorms and output projection), the WordPiece conditioner on a local
tokenizer, and a text-to-image prior built from both."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.conditioning import BERTCaption
from ldm.nn.bert import BERTEmbedder
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "##s", "sandal", "bag"]


def text_prior(conditioner: dict, encoder: dict):
    """configs/test/ldm_text.yaml's tiny prior (UNet context_dim 32) with another conditioner and text encoder."""
    cfg = OmegaConf.load(ROOT / "configs" / "test" / "ldm_text.yaml")
    cfg.model.params.conditioner_config = conditioner
    cfg.model.params.cond_stage_config = encoder
    torch.manual_seed(0)
    return instantiate_from_config(cfg.model, key="model")


@pytest.fixture
def vocab_dir(tmp_path):
    """A folder laid out as bert-base-uncased's (a WordPiece `vocab.txt`), with twelve entries."""
    pytest.importorskip("transformers")
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return tmp_path


def test_state_dict_keys_are_the_original_checkpoints():
    """The keys (and shapes) of latent-diffusion's `cond_stage_model` for depth 2, derived by hand from its bundled
    x_transformer.py: TransformerWrapper(token_emb, pos_emb.emb, attn_layers, norm, to_logits) around an Encoder
    whose `layers` alternate [LayerNorm, Attention, Residual] and [LayerNorm, FeedForward, Residual]."""
    d, inner, ff, vocab, length = 16, 2 * 8, 64, 12, 6
    attention = {"0.weight": (d,), "0.bias": (d,), "1.to_q.weight": (inner, d), "1.to_k.weight": (inner, d),
                 "1.to_v.weight": (inner, d), "1.to_out.weight": (d, inner), "1.to_out.bias": (d,)}
    feedforward = {"0.weight": (d,), "0.bias": (d,), "1.net.0.0.weight": (ff, d), "1.net.0.0.bias": (ff,),
                   "1.net.2.weight": (d, ff), "1.net.2.bias": (d,)}
    expected = {"transformer.token_emb.weight": (vocab, d), "transformer.pos_emb.emb.weight": (length, d)}
    for j, block in enumerate([attention, feedforward, attention, feedforward]):
        expected.update({f"transformer.attn_layers.layers.{j}.{k}": s for k, s in block.items()})
    expected.update({"transformer.norm.weight": (d,), "transformer.norm.bias": (d,),
                     "transformer.to_logits.weight": (vocab, d), "transformer.to_logits.bias": (vocab,)})
    model = BERTEmbedder(n_embed=d, n_layer=2, vocab_size=vocab, max_seq_len=length, heads=2, dim_head=8)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert list(model.state_dict()) == list(expected)  # the order too: the original's module order
    # a state dict of that layout loads strictly; the unused language-model head is frozen, the rest trains
    model.load_state_dict({k: torch.randn(s) for k, s in expected.items()}, strict=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"transformer.to_logits.weight", "transformer.to_logits.bias"}


def test_original_defaults_are_8_heads_of_64():
    """latent-diffusion builds `Encoder(dim=n_embed, depth=n_layer)`: x-transformers 0.x's 8 heads of 64."""
    with torch.device("meta"):
        model = BERTEmbedder(n_embed=1280, n_layer=1)
    attn = model.transformer.attn_layers.layers[0][1]
    assert attn.heads == 8 and attn.to_q.weight.shape == (512, 1280)
    assert model.transformer.token_emb.weight.shape == (30522, 1280)
    assert model.transformer.pos_emb.emb.weight.shape == (77, 1280) and model.dim == 1280


def _x_transformers_oracle(model: BERTEmbedder, vocab: int, length: int, dim: int, depth: int, heads: int,
                           dim_head: int) -> nn.Module:
    """The installed x-transformers configured as latent-diffusion's encoder, our weights copied by name.

    Its 2.x release drops the biases of 0.x's LayerNorms and attention output and scales the absolute positions
    by dim^-0.5: those modules are swapped for biased ones and the scale set to 1; the rest (attention,
    feed-forward, residual layout, pre-norm) is its own code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from x_transformers import Encoder, TransformerWrapper

    ref = TransformerWrapper(num_tokens=vocab, max_seq_len=length, attn_layers=Encoder(
        dim=dim, depth=depth, heads=heads, attn_dim_head=dim_head))
    ref.pos_emb.scale = 1.0
    for layer in ref.attn_layers.layers:
        layer[0][0] = nn.LayerNorm(dim)
        if hasattr(layer[1], "to_out"):
            layer[1].to_out = nn.Linear(heads * dim_head, dim)
    ref.attn_layers.final_norm = nn.LayerNorm(dim)

    def name(key: str) -> str:
        key = key.removeprefix("transformer.")
        key = re.sub(r"^token_emb\.", "token_emb.emb.", key)
        key = re.sub(r"^norm\.", "attn_layers.final_norm.", key)
        key = re.sub(r"^(attn_layers\.layers\.\d+)\.0\.", r"\1.0.0.", key)
        return key.replace(".1.net.", ".1.ff.")

    state = {name(k): v for k, v in model.state_dict().items() if "to_logits" not in k}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert missing == ["to_logits.weight"] and unexpected == []  # every weight of ours has its counterpart
    return ref.eval()


def test_forward_equals_x_transformers():
    vocab, length, dim, depth, heads, dim_head = 40, 10, 16, 2, 2, 8
    torch.manual_seed(0)
    model = BERTEmbedder(n_embed=dim, n_layer=depth, vocab_size=vocab, max_seq_len=length, heads=heads,
                         dim_head=dim_head).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases and norm gains away from their 0 / 1 initialisation
            p.normal_(0.0, 0.3)
    ref = _x_transformers_oracle(model, vocab, length, dim, depth, heads, dim_head)
    ids = torch.randint(0, vocab, (3, length))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids, return_embeddings=True)
        assert ours.shape == (3, length, dim)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        # shorter than max_seq_len: the first positions' embeddings
        torch.testing.assert_close(model(ids[:, :7]), ref(ids[:, :7], return_embeddings=True), atol=1e-5, rtol=0)
        # padding masked out of the keys: the tokens' embeddings are x-transformers' masked ones
        mask = torch.ones(3, length, dtype=torch.bool)
        mask[0, 4:] = False
        mask[1, 7:] = False
        masked = model(ids, mask)
        torch.testing.assert_close(masked[mask], ref(ids, mask=mask, return_embeddings=True)[mask], atol=1e-5, rtol=0)
        assert not torch.allclose(masked[0, :4], ours[0, :4], atol=1e-3)  # the mask matters


def test_condition_keeps_the_originals_unmasked_context_or_the_mask():
    torch.manual_seed(0)
    model = BERTEmbedder(n_embed=16, n_layer=1, vocab_size=12, max_seq_len=8, heads=2, dim_head=8).eval()
    ids = torch.tensor([[2, 5, 6, 3, 0, 0, 0, 0], [2, 3, 0, 0, 0, 0, 0, 0]])
    mask = ids > 0
    mask[:, 0] = True
    out = model.condition({"context": ids, "context_mask": mask, "other": torch.ones(2)})
    assert out["context"].shape == (2, 8, 16) and out["context_mask"].all() and "other" in out
    torch.testing.assert_close(out["context"], model(ids))  # the original attends to the padding too
    model.use_mask = True
    out = model.condition({"context": ids, "context_mask": mask})
    assert torch.equal(out["context_mask"], mask)
    changed = ids.clone()
    changed[:, 5:] = 7  # other ids where the mask is False change nothing where it is True
    torch.testing.assert_close(model(changed, mask)[mask], out["context"][mask])
    empty = model(ids, torch.zeros_like(mask))  # an all-padding row still gives finite embeddings
    assert torch.isfinite(empty).all()
    with pytest.raises(ValueError, match="9 tokens are more than the BERTEmbedder's max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_wordpiece_captions_from_a_local_tokenizer(vocab_dir):
    cap = BERTCaption(max_length=8, tokenizer_path=str(vocab_dir))
    cond = cap.encode({"caption": ["A photo of cats", "a photo of a sandal and a bag"]})
    # [CLS] a photo of cat ##s [SEP] [PAD]: lower-cased, WordPiece-split, truncated keeping [SEP], padded with 0
    assert cond["context"].tolist() == [[2, 5, 6, 7, 8, 9, 3, 0], [2, 5, 6, 7, 5, 10, 1, 3]]
    assert cond["context_mask"].tolist() == [[True] * 7 + [False], [True] * 8]
    null = cap.null(3)  # latent-diffusion's unconditional pass embeds the empty caption: [CLS] [SEP]
    assert null["context"].tolist() == [[2, 3, 0, 0, 0, 0, 0, 0]] * 3
    assert null["context_mask"].tolist() == [[True, True] + [False] * 6] * 3
    assert torch.equal(cap.from_user("a cat", 2)["context"][:, :4], torch.tensor([[2, 5, 8, 3]] * 2))
    with pytest.raises(ValueError, match=r"cond must be a caption or one per sample \(strings, up to 8 tokens of the "):
        cap.from_user(["one"], 2)


def test_a_tokenizer_larger_than_the_embedders_vocabulary_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS + [f"w{i}" for i in range(30522)]) + "\n")
    cap = BERTCaption(max_length=8, tokenizer_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"has 30534 tokens, more than the vocab_size 30522 its text encoder embeds"):
        cap.encode({"caption": ["a cat"]})


def test_a_tokenizer_folder_without_its_files_is_refused(tmp_path):
    """transformers 5 builds a special-tokens-only BERT tokenizer from a folder without `vocab.txt`: every word
    would silently become [UNK]."""
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=r"the tokenizer '.*' of BERTCaption has no vocabulary beyond its special "
                                         r"tokens|cannot load the tokenizer '.*' of BERTCaption"):
        BERTCaption(tokenizer_path=str(tmp_path)).encode({"caption": ["a cat"]})


def test_caption_conditioners_import_no_transformers_until_used():
    """`transformers` is optional: building the conditioners and encoders' modules must not import it."""
    code = ("import sys; import ldm.conditioning as c, ldm.nn.bert, ldm.nn.hf_text; c.BERTCaption(); "
            "c.HFCaption('x'); assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_text_to_image_prior_with_the_bert_embedder(vocab_dir):
    """A tiny LAION-style prior: WordPiece ids through a trained BERTEmbedder into the UNet's cross-attention."""
    prior = text_prior({"target": "ldm.conditioning.BERTCaption",
                        "params": {"max_length": 8, "tokenizer_path": str(vocab_dir)}},
                       {"target": "ldm.nn.bert.BERTEmbedder",
                        "params": {"n_embed": 32, "n_layer": 1, "vocab_size": len(WORDS), "max_seq_len": 8, "heads": 2,
                                   "dim_head": 16}})
    latents = torch.randn(2, *prior.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = prior.conditioner.encode({"caption": ["a photo of a cat", "a bag"]})
    loss, _ = prior.compute_loss(latents, cond, generator=torch.Generator().manual_seed(0))
    loss.backward()
    no_grad = [n for n, p in prior.cond_stage_model.named_parameters() if p.grad is None]
    assert no_grad == ["transformer.to_logits.weight", "transformer.to_logits.bias"]  # the rest trains
    prior.eval()
    kw = dict(generator=torch.Generator().manual_seed(0), steps=2)
    a = prior.sample(2, cond="a photo of a sandal", guidance_scale=3.0, **kw)
    assert a.shape == (2, 1, 32, 32) and torch.isfinite(a).all()
