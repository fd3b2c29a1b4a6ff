"""ImageBART's networks: the original's encoder embeddings, logits, posterior and loss from its own weights
(`../shared/fixtures/imagebart/denoising_xtransformer`), minGPT's logits from taming-transformers' GPT, and
cached decoding equal to the uncached network."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from imagebart.process import MultinomialDiffusion, schedule_betas
from imagebart.transformer import DecoderOnly, EncoderDecoder, convert_original_state_dict
from tests.fixture_paths import fixture_dir


def import_mingpt():
    """taming's minGPT imports `top_k_top_p_filtering` from `transformers` for a sampling helper its GPT never
    calls (transformers 4.40 removed it): a stand-in for the import is enough to build the network."""
    import sys
    import types

    if "taming.modules.transformer.mingpt" in sys.modules:
        return sys.modules["taming.modules.transformer.mingpt"]
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None and hasattr(transformers, "top_k_top_p_filtering"):
        return pytest.importorskip("taming.modules.transformer.mingpt")
    if transformers is None:
        sys.modules["transformers"] = types.SimpleNamespace(top_k_top_p_filtering=None)
    else:
        transformers.top_k_top_p_filtering = None
    try:
        return pytest.importorskip("taming.modules.transformer.mingpt")
    finally:  # no other test sees the stand-in
        if transformers is None:
            del sys.modules["transformers"]
        else:
            del transformers.top_k_top_p_filtering


def original_fixture():
    root = fixture_dir("imagebart", "denoising_xtransformer")
    config = json.loads((root / "config.json").read_text())
    return config, load_file(str(root / "state_dict.safetensors")), load_file(str(root / "io.safetensors"))


def fixture_network(config) -> EncoderDecoder:
    kw = config["init_kwargs"]["transformer_config"]["params"]
    return EncoderDecoder(kw["dec_num_tokens"], kw["dec_max_seq_len"], kw["n_scales"], dim=kw["dim"],
                          enc_depth=kw["enc_depth"], dec_depth=kw["dec_depth"], heads=kw["enc_heads"],
                          num_classes=10, enc_num_tokens=kw["enc_num_tokens"]).eval()


def test_original_weights_give_the_original_outputs():
    """DenoisingXTransformer (CompVis/imagebart c11ea83): encoder embeddings, plain decoder logits, the
    residual-scaled logits, the posterior and the soft/hard losses."""
    config, state, io = original_fixture()
    net = fixture_network(config)
    net.load_state_dict(convert_original_state_dict(state), strict=True)
    process = MultinomialDiffusion(16, schedule_betas(4, "geometric"))
    net.set_alphas(process.alphas)
    t, cond = io["scale"][:, 0], io["class_label"]
    x_prev, x_t = io["x"], io["c_xt"]
    with torch.no_grad():
        emb = net.encode(x_t, t, cond)
        plain = net.decoder(io["tgt"], context=emb)
        logits = net(x_prev, x_t, t, cond)
    torch.testing.assert_close(net.source(x_t, t, cond), io["src"], rtol=0, atol=0)
    torch.testing.assert_close(emb, io["encoder_embeddings"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, io["xtransformer_logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, io["logits"], atol=1e-5, rtol=1e-4)
    x0 = io["x0_indices"].flatten(1)
    posterior = process.posterior(x0, x_t, t)
    torch.testing.assert_close(posterior, io["posterior_flat"], atol=1e-6, rtol=1e-5)
    losses = process.losses(io["logits"], io["target"], posterior, alpha=1.0)
    torch.testing.assert_close(losses["loss_soft"].mean(), io["loss_soft"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses["loss_hard"].mean(), io["loss_hard"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses["loss"].mean(), io["loss"][0], atol=1e-6, rtol=1e-5)
    print(f"logits max abs diff {(logits - io['logits']).abs().max():.2e}")


def test_residual_scaling_is_the_forward_kernel_at_zero_weights():
    """With a zero decoder head and log_scalors 0, the transition is exactly q(x_{t-1} -> x_t)'s likelihood
    as a function of x_{t-1}: the residual adds log(a_t onehot(x_t) + (1 - a_t) / K)."""
    net = EncoderDecoder(8, 6, 3, dim=16, enc_depth=1, dec_depth=1, heads=2, dim_head=8).eval()
    process = MultinomialDiffusion(8, schedule_betas(3, "geometric"))
    net.set_alphas(process.alphas)
    torch.nn.init.zeros_(net.decoder.to_logits.weight)
    torch.nn.init.zeros_(net.decoder.to_logits.bias)
    x_t, t = torch.randint(0, 8, (2, 6)), torch.tensor([1, 3])
    with torch.no_grad():
        logits = net(torch.randint(0, 8, (2, 6)), x_t, t)
    torch.testing.assert_close(logits, process.kernel_log_probs(x_t, t))


def test_decoder_only_matches_taming_mingpt():
    """The last scale's network in minGPT's layout gives taming-transformers' GPT logits from the same weights
    (the taming-transformers-rom1504 package is the independent oracle)."""
    mingpt = import_mingpt()
    torch.manual_seed(0)
    gpt = mingpt.GPT(vocab_size=12, block_size=1 + 1 + 15, n_layer=2, n_head=4, n_embd=32, n_unmasked=2).eval()
    for p in gpt.parameters():  # off the default init, so every weight matters
        torch.nn.init.normal_(p, std=0.2)
    ours = DecoderOnly(12, 16, 3, dim=32, depth=2, heads=4, num_classes=10, n_unmasked=2).eval()
    ours.load_state_dict(convert_original_state_dict({f"transformer.{k}": v for k, v in gpt.state_dict().items()}),
                         strict=True)
    t, cond, x = torch.tensor([3, 3]), torch.tensor([4, 10]), torch.randint(0, 12, (2, 16))
    with torch.no_grad():
        theirs, _ = gpt(torch.cat([t[:, None], cond[:, None], x[:, :-1]], 1))
        mine = ours(x, None, t, cond)
    torch.testing.assert_close(mine, theirs[:, 1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only"])
def test_cached_decoding_equals_the_uncached_network(kind):
    """Feeding tokens one at a time through the key/value cache gives the teacher-forced logits (1e-5)."""
    torch.manual_seed(1)
    if kind == "encoder_decoder":
        net = EncoderDecoder(10, 12, 3, dim=32, enc_depth=2, dec_depth=2, heads=4, dim_head=8, num_classes=5)
        net.set_alphas(MultinomialDiffusion(10, schedule_betas(3, "geometric")).alphas)
        torch.nn.init.normal_(net.log_scalors, std=0.3)
    else:
        net = DecoderOnly(10, 12, 3, dim=32, depth=2, heads=4, num_classes=5, n_unmasked=2)
    net.eval()
    x_prev, x_t = torch.randint(0, 10, (3, 12)), torch.randint(0, 10, (3, 12))
    t, cond = torch.tensor([1, 2, 3]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        full = net(x_prev, x_t, t, cond)
        state, token, steps = net.start(x_t, t, cond), None, []
        for i in range(12):
            steps.append(net.next_logits(state, token))
            token = x_prev[:, i]
        start = net.start(x_t, t, cond)
        uncached = [net.prefix_logits(start, x_prev[:, :i]) for i in range(12)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(uncached, 1), full, atol=1e-5, rtol=1e-5)
