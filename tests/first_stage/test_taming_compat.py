"""A taming-transformers VQModel checkpoint (with its loss keys) loads into our VQModel and computes the
same encodings, indices and decodings. Module-level equivalence is in test_modules_vs_taming.py.
"""

from __future__ import annotations

import pytest
import torch

from ldm.first_stage.models import VQModel
from tests.first_stage.test_modules_vs_taming import perturbed

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

DD = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
NO_GAN = {"target": "ldm.first_stage.losses.VQLPIPSWithDiscriminator",
          "params": {"disc_start": 10**9, "perceptual_weight": 0.0}}


@pytest.fixture(scope="module")
def taming_parts():
    torch.manual_seed(0)
    enc = perturbed(taming_model.Encoder(**DD), 1)
    dec = perturbed(taming_model.Decoder(**DD), 2)
    quant = perturbed(taming_quantize.VectorQuantizer2(16, 8, beta=0.25, legacy=True), 3)
    qc, pqc = perturbed(torch.nn.Conv2d(8, 8, 1), 4), perturbed(torch.nn.Conv2d(8, 8, 1), 5)
    return enc, dec, quant, qc, pqc


def taming_vqmodel_state(parts) -> dict[str, torch.Tensor]:
    """The key layout of a taming VQModel checkpoint (with some training-only loss keys)."""
    enc, dec, quant, qc, pqc = parts
    state = {}
    for prefix, m in (("encoder.", enc), ("decoder.", dec), ("quantize.", quant), ("quant_conv.", qc),
                      ("post_quant_conv.", pqc)):
        state.update({prefix + k: v for k, v in m.state_dict().items()})
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    return state


def test_vqmodel_loads_taming_checkpoint_and_matches(taming_parts, tmp_path):
    enc, dec, quant, qc, pqc = taming_parts
    path = tmp_path / "taming_vq.ckpt"
    torch.save({"state_dict": taming_vqmodel_state(taming_parts), "global_step": 7}, path)
    model = VQModel(DD, NO_GAN, n_embed=16, embed_dim=8, ckpt_path=str(path)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        zq_ref, loss_ref, (_, _, idx_ref) = quant(qc(enc(x)))
        zq, loss, (_, _, idx) = model.encode(x)
        torch.testing.assert_close(zq, zq_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=1e-4)
        assert torch.equal(idx, idx_ref)
        torch.testing.assert_close(model.decode(zq), dec(pqc(zq_ref)), atol=1e-5, rtol=1e-4)
        tokens = model.encode_to_indices(x)
        assert tokens.shape == (2, 8, 8) and torch.equal(tokens.flatten(), idx_ref)
        ref_entry = quant.get_codebook_entry(idx_ref, (2, 8, 8, 8))
        torch.testing.assert_close(model.decode_indices(tokens), dec(pqc(ref_entry)), atol=1e-5, rtol=1e-4)
