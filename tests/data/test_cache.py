"""The latent cache equals direct encoding, resumes after an interruption, and refuses another first stage."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from ldm.data.cache import LatentCache, build_cache


class Images(Dataset):
    def __init__(self, n=10):
        self.x = torch.linspace(-1, 1, n * 16).view(n, 1, 4, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "class_label": i % 3}


class CountingVQ(torch.nn.Module):
    latent_kind, n_embed = "tokens", 8

    def __init__(self, fail_after=None):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def latent_shape(self):
        return (2, 2)

    def encode_to_latent(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return ((x[:, 0, ::2, ::2] + 1) * 3.5).round().long()  # (B, 2, 2) in 0..7


FP = {"latent_kind": "tokens", "latent_shape": [2, 2], "n_embed": 8, "ckpt_sha256": "abc"}


def test_cache_matches_direct_encoding(tmp_path):
    ds = Images()
    build_cache(CountingVQ(), ds, tmp_path, FP, batch_size=3, shard_size=4, progress=False)
    cache = LatentCache(str(tmp_path), expect=FP)
    assert len(cache) == 10
    direct = CountingVQ().encode_to_latent(ds.x)
    assert torch.equal(torch.stack([cache[i]["tokens"] for i in range(10)]), direct)
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
    with pytest.raises(ValueError, match="holds a cache built with another first stage"):
        build_cache(CountingVQ(), Images(), tmp_path, {**FP, "ckpt_sha256": "other"}, progress=False)
