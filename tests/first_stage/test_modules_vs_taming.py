"""Encoder, Decoder and VectorQuantizer load taming-transformers' weights with strict=True and compute
the same numbers. The oracle is the installed `taming-transformers-rom1504` package (tests only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.first_stage.modules import Decoder, Encoder
from ldm.first_stage.quantize import VectorQuantizer

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

TOL = dict(atol=1e-5, rtol=1e-4)
# three levels, attention at 8x8 (level 1) and in the middle; two blocks per encoder level
DD = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
          num_res_blocks=2, attn_resolutions=[8], dropout=0.0)
DD_KL = dict(DD, double_z=True, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-default weights, so unit norm scales and zero biases cannot hide a mismatch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def state_layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("dd", [DD, DD_KL], ids=["vq_attn", "kl_noattn"])
def test_encoder_decoder_match_taming(dd):
    torch.manual_seed(0)
    ref_e, ref_d = perturbed(taming_model.Encoder(**dd), 1), perturbed(taming_model.Decoder(**dd), 2)
    ours_e, ours_d = Encoder(**dd).eval(), Decoder(**dd).eval()
    assert state_layout(ours_e) == state_layout(ref_e)  # same names, shapes and order
    assert state_layout(ours_d) == state_layout(ref_d)
    ours_e.load_state_dict(ref_e.state_dict(), strict=True)
    ours_d.load_state_dict(ref_d.state_dict(), strict=True)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        h = ours_e(x)
        torch.testing.assert_close(h, ref_e(x), **TOL)
        z = h[:, : dd["z_channels"]]
        torch.testing.assert_close(ours_d(z), ref_d(z), **TOL)


def test_attention_present_where_configured():
    enc, dec = Encoder(**DD), Decoder(**DD)
    assert [len(level.attn) for level in enc.down] == [0, 2, 0]  # 16x16, 8x8, 4x4
    assert [len(level.attn) for level in dec.up] == [0, 3, 0]  # num_res_blocks + 1 per level
    assert "down.1.attn.1.q.weight" in enc.state_dict() and "up.1.attn.2.proj_out.bias" in dec.state_dict()


def test_decoder_options_and_extra_keys():
    torch.manual_seed(0)
    dd = dict(DD_KL, give_pre_end=False, tanh_out=True, attn_type="vanilla")  # latent-diffusion's extras
    enc, dec = Encoder(**dd).eval(), Decoder(**dd).eval()
    z = torch.randn(1, 8, 8, 8) * 10
    with torch.no_grad():
        assert dec(z).abs().max() <= 1.0
        assert enc(torch.randn(1, 3, 16, 16)).shape == (1, 16, 8, 8)
        assert Decoder(**dict(dd, give_pre_end=True))(z).shape == (1, 32, 16, 16)
    no_mid_attn = Decoder(**dict(dd, attn_type="none"))
    assert not any(".attn" in k for k in no_mid_attn.state_dict())
    with pytest.raises(ValueError, match="attn_type must be one of vanilla, none; got 'linear'"):
        Encoder(**dict(dd, attn_type="linear"))
    with pytest.warns(UserWarning, match="ignores unknown ddconfig keys \\['dropuot'\\]"):
        Encoder(**dict(dd, dropuot=0.1))


def quantize_pair(n_e: int = 16, e_dim: int = 8, **kw):
    torch.manual_seed(0)
    ref = perturbed(taming_quantize.VectorQuantizer2(n_e, e_dim, beta=0.25, **kw), 4)
    ours = VectorQuantizer(n_e, e_dim, beta=0.25, **kw).eval()
    assert state_layout(ours) == state_layout(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("legacy", [True, False])
def test_full_vq_path_matches_taming(legacy):
    """encoder -> quant_conv -> quantiser -> post_quant_conv -> decoder, piece by piece against taming."""
    torch.manual_seed(0)
    ref_e, ref_d = perturbed(taming_model.Encoder(**DD), 1), perturbed(taming_model.Decoder(**DD), 2)
    ref_qc, ref_pqc = perturbed(torch.nn.Conv2d(8, 8, 1), 5), perturbed(torch.nn.Conv2d(8, 8, 1), 6)
    ref_q, ours_q = quantize_pair(legacy=legacy)
    ours_e, ours_d = Encoder(**DD).eval(), Decoder(**DD).eval()
    ours_e.load_state_dict(ref_e.state_dict(), strict=True)
    ours_d.load_state_dict(ref_d.state_dict(), strict=True)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1

    h_ref = ref_qc(ref_e(x)).detach().requires_grad_(True)
    zq_ref, loss_ref, (_, _, idx_ref) = ref_q(h_ref)
    h = ref_qc(ours_e(x)).detach().requires_grad_(True)
    zq, loss, (perplexity, min_encodings, idx) = ours_q(h)
    torch.testing.assert_close(h, h_ref, **TOL)
    assert idx.dtype == torch.long and idx.shape == idx_ref.shape == (2 * 4 * 4,)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(zq, zq_ref, **TOL)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert min_encodings is None and perplexity.ndim == 0  # taming's VectorQuantizer2 gives None here
    # same gradients into the encoder output and the codebook
    (zq.square().sum() + loss).backward()
    (zq_ref.square().sum() + loss_ref).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, **TOL)
    torch.testing.assert_close(ours_q.embedding.weight.grad, ref_q.embedding.weight.grad, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(ours_d(ref_pqc(zq)), ref_d(ref_pqc(zq_ref)), **TOL)
        entry = ours_q.get_codebook_entry(idx, (2, 4, 4, 8))
        torch.testing.assert_close(entry, ref_q.get_codebook_entry(idx_ref, (2, 4, 4, 8)), **TOL)
        torch.testing.assert_close(entry, zq, **TOL)


def test_sane_index_shape_matches_taming():
    ref, ours = quantize_pair(sane_index_shape=True)
    z = torch.randn(2, 8, 3, 5) * 0.1
    with torch.no_grad():
        _, _, (_, _, i_ref) = ref(z)
        zq, _, (_, _, i_ours) = ours(z)
    assert i_ours.shape == (2, 3, 5) and torch.equal(i_ours, i_ref)
    torch.testing.assert_close(zq, ours.get_codebook_entry(i_ours.reshape(2, -1), (2, 3, 5, 8)), **TOL)


@pytest.mark.parametrize("unknown_index", ["random", "extra", 2])
@pytest.mark.parametrize("sane", [False, True])
def test_remap_matches_taming(tmp_path, unknown_index, sane):
    used = np.array([1, 3, 5, 7, 9, 11], dtype=np.int64)
    np.save(tmp_path / "used.npy", used)
    ref, ours = quantize_pair(n_e=16, e_dim=4, remap=str(tmp_path / "used.npy"), unknown_index=unknown_index,
                              sane_index_shape=sane)
    assert ours.re_embed == ref.re_embed == (7 if unknown_index == "extra" else 6)
    assert "used" in ours.state_dict()
    code = ref.embedding.weight.detach()
    # used codes only, so the mapping is deterministic; one position is made unknown below when not random
    pick = torch.tensor(used)[torch.randint(0, 6, (2 * 3 * 3,), generator=torch.Generator().manual_seed(1))]
    if unknown_index != "random":
        pick[4] = 0  # code 0 is not in `used`
    z = code[pick].view(2, 3, 3, 4).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        zq_ref, _, (_, _, i_ref) = ref(z)
        zq, _, (_, _, i_ours) = ours(z)
    assert i_ours.shape == i_ref.shape == ((2, 3, 3) if sane else (18, 1))
    assert torch.equal(i_ours, i_ref)
    torch.testing.assert_close(zq, zq_ref, **TOL)
    i_copy = i_ref.clone()
    torch.testing.assert_close(ours.get_codebook_entry(i_ours, (2, 3, 3, 4)),
                               ref.get_codebook_entry(i_copy, (2, 3, 3, 4)), **TOL)
