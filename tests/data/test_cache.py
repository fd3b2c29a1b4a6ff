"""The latent cache equals direct encoding, resumes after an interruption, and refuses another first stage
or another latent kind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from ldm.data.cache import LatentCache, build_cache, first_stage_fingerprint
from ldm.first_stage.models import AutoencoderKL, VQModel

DD = {"double_z": False, "z_channels": 4, "resolution": 16, "in_channels": 1, "out_ch": 1, "ch": 32,
      "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
IDENTITY = {"target": "torch.nn.Identity"}


class Images(Dataset):
    def __init__(self, n=10):
        self.x = torch.linspace(-1, 1, n * 16).view(n, 1, 4, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "class_label": i % 3}


class CountingVQ(torch.nn.Module):
    latent_kinds, latent_kind, n_embed = ("tokens",), "tokens", 8

    def __init__(self, fail_after=None):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def resolve_kind(self, kind):
        return VQModel.resolve_kind(self, kind)

    def latent_shape(self, image_size=None, kind=None):
        return (2, 2)

    def encode_to_latent(self, x):
        return ((x[:, 0, ::2, ::2] + 1) * 3.5).round().long()  # (B, 2, 2) in 0..7

    def encode_for_prior(self, x, kind=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return {"tokens": self.encode_to_latent(x)}


FP = {"latent_kind": "tokens", "latent_shape": [2, 2], "n_embed": 8, "ckpt_sha256": "abc"}


def test_cache_matches_direct_encoding(tmp_path):
    ds = Images()
    build_cache(CountingVQ(), ds, tmp_path, FP, batch_size=3, shard_size=4, progress=False)
    cache = LatentCache(str(tmp_path), expect=FP)
    assert len(cache) == 10
    direct = CountingVQ().encode_to_latent(ds.x)
    assert torch.equal(torch.stack([cache[i]["tokens"] for i in range(10)]), direct)
    assert cache.data["tokens"].dtype == torch.int16 and set(cache[0]) == {"tokens", "class_label"}
    assert cache.meta["latent_kind"] == "tokens" and cache.meta["keys"] == ["tokens"]
    assert [cache[i]["class_label"] for i in range(4)] == [0, 1, 2, 0]


def test_interrupted_build_resumes_without_recomputing(tmp_path):
    ds = Images()
    with pytest.raises(KeyboardInterrupt):
        build_cache(CountingVQ(fail_after=3), ds, tmp_path, FP, batch_size=2, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(str(tmp_path))
    second = CountingVQ()
    build_cache(second, ds, tmp_path, FP, batch_size=2, shard_size=4, progress=False)
    assert second.calls == 3  # shard 0 was kept; shard 1 (2 batches) and shard 2 (1 batch) remain
    assert len(LatentCache(str(tmp_path))) == 10


def test_other_first_stage_is_refused(tmp_path):
    build_cache(CountingVQ(), Images(), tmp_path, FP, progress=False)
    with pytest.raises(ValueError, match=r"built with another first stage \(n_embed: cache 8 vs model 16"):
        LatentCache(str(tmp_path), expect={**FP, "n_embed": 16})
    with pytest.raises(ValueError, match=r"holds latents of first stage ckpt_sha256='abc'; refusing to build latents "
                                         r"of first stage ckpt_sha256='other' into it: choose another --out"):
        build_cache(CountingVQ(), Images(), tmp_path, {**FP, "ckpt_sha256": "other"}, progress=False)


def tiny_kl():
    torch.manual_seed(0)
    return AutoencoderKL({**DD, "double_z": True}, IDENTITY, embed_dim=3).eval()


def tiny_vq():
    torch.manual_seed(0)
    return VQModel(DD, IDENTITY, n_embed=16, embed_dim=3).eval()


class FMNISTLike(Dataset):
    def __init__(self, n=6):
        self.x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "class_label": i % 3}


def test_kl_cache_round_trip_stores_the_posterior(tmp_path):
    model, ds = tiny_kl(), FMNISTLike()
    fp = first_stage_fingerprint(model)
    assert fp["latent_kind"] == "continuous" and fp["latent_shape"] == [3, 8, 8]
    build_cache(model, ds, tmp_path, fp, batch_size=4, shard_size=4, progress=False)
    cache = LatentCache(str(tmp_path), expect=fp)
    assert cache.meta["keys"] == ["posterior_logvar", "posterior_mean"]
    with torch.no_grad():
        posterior = model.encode(ds.x)
    mean = torch.stack([cache[i]["posterior_mean"] for i in range(len(ds))])
    logvar = torch.stack([cache[i]["posterior_logvar"] for i in range(len(ds))])
    assert mean.dtype == logvar.dtype == torch.float32 and mean.shape == (6, 3, 8, 8)
    torch.testing.assert_close(mean, posterior.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logvar, posterior.logvar, rtol=1e-6, atol=1e-6)
    assert set(cache[0]) == {"posterior_mean", "posterior_logvar", "class_label"}


def test_vq_continuous_cache_holds_the_prequantisation_latent(tmp_path):
    model, ds = tiny_vq(), FMNISTLike()
    fp = first_stage_fingerprint(model, kind="continuous")
    assert fp["latent_shape"] == [3, 8, 8] and "n_embed" not in fp
    build_cache(model, ds, tmp_path, fp, batch_size=4, shard_size=4, progress=False, kind="continuous")
    cache = LatentCache(str(tmp_path), expect=fp)
    assert cache.meta["latent_kind"] == "continuous" and cache.meta["keys"] == ["latent"]
    with torch.no_grad():
        direct = model.quant_conv(model.encoder(ds.x))
    torch.testing.assert_close(torch.stack([cache[i]["latent"] for i in range(6)]), direct, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fingerprint describes tokens"):
        build_cache(model, ds, tmp_path / "x", first_stage_fingerprint(model), progress=False, kind="continuous")


def test_cache_of_another_kind_is_refused(tmp_path):
    model, ds = tiny_vq(), FMNISTLike()
    build_cache(model, ds, tmp_path, first_stage_fingerprint(model), progress=False)  # tokens by default
    cache = LatentCache(str(tmp_path))
    wanted = first_stage_fingerprint(model, kind="continuous")
    with pytest.raises(ValueError, match=r"holds tokens but this prior models continuous latents; rebuild it with "
                                         r"scripts/cache_latents.py --kind continuous"):
        cache.check_compatible(wanted)
    build_cache(model, ds, tmp_path / "z", wanted, progress=False, kind="continuous")
    with pytest.raises(ValueError, match=r"holds continuous latents but this prior models tokens; .* --kind tokens"):
        LatentCache(str(tmp_path / "z"), expect=first_stage_fingerprint(model))
    with pytest.raises(ValueError, match=r"AutoencoderKL offers latents of kind 'continuous', not 'tokens'"):
        build_cache(tiny_kl(), ds, tmp_path / "kl", {}, progress=False, kind="tokens")


@pytest.mark.parametrize("key", ["tokens", "latent"])
def test_cache_written_before_keys_were_recorded_still_loads(tmp_path, key):
    kind = "tokens" if key == "tokens" else "continuous"
    z = torch.arange(2 * 4).view(2, 2, 2).to(torch.int16) if kind == "tokens" else torch.randn(2, 3, 2, 2)
    save_file({key: z, "class_label": torch.tensor([4, 5]), "index": torch.arange(2)},
              str(tmp_path / "shard-00000.safetensors"))
    fp = {"latent_kind": kind, "latent_shape": [2, 2], **({"n_embed": 8} if kind == "tokens" else {})}
    (tmp_path / "meta.json").write_text(json.dumps({"fingerprint": fp, "count": 2, "shard_size": 8192,
                                                    "latent_kind": kind, "complete": True}))
    cache = LatentCache(str(tmp_path))
    assert len(cache) == 2 and set(cache[1]) == {key, "class_label"} and cache[1]["class_label"] == 5
    assert torch.equal(cache[1][key], z[1].long() if kind == "tokens" else z[1])
    # a continuous cache that recorded (h, w) is compatible with the (C, h, w) a first stage reports now
    cache.check_compatible({**fp, "latent_shape": [3, 2, 2] if kind == "continuous" else [2, 2]})
