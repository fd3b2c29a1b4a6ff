"""Latent / token cache: the first stage runs once per image, and the priors train from its output.

A cache folder holds `shard-00000.safetensors`, ... with exactly what the first stage's
`encode_for_prior(x, kind)` returns (tokens `(N, h, w)` int16/int32; `latent` `(N, C, h, w)`;
`posterior_mean` / `posterior_logvar` `(N, C, h, w)` float32), plus `class_label` (N,) and `index`
(N,) dataset indices, and `meta.json` (`ldm.data.cache_meta`) recording the split, the data config,
the first stage and the latent kind. Items the data set skips (unreadable images) are left out, never
replaced: `index` stays true, and each shard's safetensors metadata lists its skipped items, which
`meta.json` sums up. Shards are written to a temporary name and renamed, so an interrupted build
resumes at the first missing shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from ldm.checkpoint import file_sha256
from ldm.data.cache_meta import (
    FORMAT,
    META,
    check_build_target,
    describe_kind,
    plain,
    skip_record,
    write_meta,
)
from ldm.data.skipped import as_skipped, is_skipped

BOOKKEEPING = ("class_label", "index")  # stored beside the latents in every shard


def first_stage_fingerprint(model: Any, ckpt_path: str | os.PathLike | None = None,
                            latent_shape: tuple[int, ...] | None = None, kind: str | None = None) -> dict[str, Any]:
    """What identifies the latents a first stage produces for a prior: kind, shape, codebook size, weights hash.

    `kind` defaults to the first stage's default `latent_kind`; a prior passes the kind it models.
    """
    kind = model.resolve_kind(kind)
    fp: dict[str, Any] = {"latent_kind": kind, "first_stage": type(model).__name__,
                          "latent_shape": list(latent_shape or model.latent_shape(kind=kind))}
    if kind == "tokens":
        fp["n_embed"] = int(model.n_embed)
    if ckpt_path and os.path.exists(ckpt_path):
        fp["ckpt_sha256"] = file_sha256(ckpt_path)
    return fp


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _token_dtype(n_embed: int) -> torch.dtype:
    return torch.int16 if n_embed <= 32767 else torch.int32


def _storable(t: torch.Tensor, kind: str, model: Any) -> torch.Tensor:
    """Integers (tokens) in the narrowest dtype that holds the codebook; floats as float32."""
    if t.is_floating_point():
        return t.float()
    return t.to(_token_dtype(int(model.n_embed)) if kind == "tokens" else torch.int32)


class _Indexed(Dataset):
    """`(dataset index, item)` for the indices of one shard, so skipped items keep their true index."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, Any]:
        return self.indices[j], self.dataset[self.indices[j]]


def _collate_indexed(pairs: list[tuple[int, Any]]) -> tuple[list[int], Any, list[tuple[int, str, str]]]:
    """(indices of the good items, their batch or None, [(index, reason, detail)] of the skipped ones)."""
    good = [(i, item) for i, item in pairs if not is_skipped(item)]
    skipped = [(i, *as_skipped(item)) for i, item in pairs if is_skipped(item)]
    return [i for i, _ in good], default_collate([item for _, item in good]) if good else None, skipped


def _encode_shard(model: Any, dataset: Dataset, indices: Sequence[int], kind: str, batch_size: int,
                  num_workers: int, device: str | torch.device, bar: tqdm) -> tuple[dict[str, torch.Tensor], list]:
    loader = DataLoader(_Indexed(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_indexed)
    encoded: dict[str, list[torch.Tensor]] = {}
    labels, kept, skipped = [], [], []
    for good, batch, bad in loader:
        skipped += bad
        bar.update(len(good) + len(bad))
        if batch is None:
            continue
        for name, t in model.encode_for_prior(batch["image"].to(device), kind).items():
            encoded.setdefault(name, []).append(t.cpu())
        labels.append(torch.as_tensor(batch.get("class_label", torch.full((len(good),), -1))).long())
        kept += good
    clash = set(encoded) & set(BOOKKEEPING)
    if clash:
        raise ValueError(f"encode_for_prior returned reserved keys {sorted(clash)}")
    tensors = {name: _storable(torch.cat(ts), kind, model) for name, ts in encoded.items()}
    tensors.update(class_label=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                   index=torch.tensor(kept, dtype=torch.long))
    return tensors, skipped


def _read_shards(out: Path, n_shards: int) -> tuple[int, list[str], list[tuple[int, str, str]]]:
    """Stored items, latent keys and skipped items of the finished shards, from their headers only."""
    count, keys, skipped = 0, set(), []
    for s in range(n_shards):
        with safe_open(str(out / _shard_name(s)), framework="pt") as f:
            count += f.get_slice("index").get_shape()[0]
            keys |= {k for k in f.keys() if k not in BOOKKEEPING}
            skipped += [tuple(r) for r in json.loads((f.metadata() or {}).get("skipped", "[]"))]
    return count, sorted(keys), skipped


@torch.no_grad()
def build_cache(model: Any, dataset: Dataset, out_dir: str | os.PathLike, fingerprint: Mapping[str, Any],
                batch_size: int = 256, shard_size: int = 8192, device: str | torch.device = "cpu",
                progress: bool = True, extra_meta: Mapping[str, Any] | None = None,
                kind: str | None = None, split: str | None = None, dataset_config: Mapping[str, Any] | None = None,
                num_workers: int = 0) -> Path:
    """Encode `dataset` with `model.encode_for_prior(x, kind)` into `out_dir`; resumes an interrupted build.

    `kind` defaults to the first stage's default `latent_kind`. `split` and `dataset_config` (the data
    set's `target`/`params`) are recorded with the fingerprint; a folder holding another cache, or
    files of its own, is refused before anything in it changes (`cache_meta.check_build_target`).
    """
    kind = model.resolve_kind(kind)
    if fingerprint.get("latent_kind", kind) != kind:
        raise ValueError(f"the fingerprint describes {describe_kind(fingerprint['latent_kind'])} but the cache is "
                         f"built with kind={kind!r}")
    out = Path(out_dir)
    meta: dict[str, Any] = {"format": FORMAT, **plain(dict(extra_meta or {})), "fingerprint": plain(dict(fingerprint)),
                            "latent_kind": kind, "dataset_size": len(dataset), "shard_size": shard_size,
                            "complete": False}
    if split is not None:
        meta["split"] = split
    if dataset_config is not None:
        meta["dataset"] = plain(dict(dataset_config))
    old = check_build_target(out, meta)
    if old is not None and old.get("complete"):
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, meta)
    model = model.to(device).eval()
    n_shards = (len(dataset) + shard_size - 1) // shard_size
    shards = [range(s * shard_size, min((s + 1) * shard_size, len(dataset))) for s in range(n_shards)]
    todo = [s for s in range(n_shards) if not (out / _shard_name(s)).exists()]
    bar = tqdm(total=len(dataset), desc=f"caching {kind} into {out}", disable=not progress,
               initial=len(dataset) - sum(len(shards[s]) for s in todo))
    for s in todo:
        tensors, skipped = _encode_shard(model, dataset, shards[s], kind, batch_size, num_workers, device, bar)
        tmp = out / f".{_shard_name(s)}.tmp"
        save_file(tensors, str(tmp), metadata={"skipped": json.dumps(skipped)})
        os.replace(tmp, out / _shard_name(s))
    bar.close()
    count, keys, skipped = _read_shards(out, n_shards)
    meta.update(count=count, skipped=skip_record(skipped))
    if count == 0:
        write_meta(out, meta)
        raise ValueError(f"no item of {f'the {split} split' if split else 'the data set'} could be read "
                         f"({len(skipped)} skipped: {meta['skipped']['reasons']}); nothing was cached in {out}")
    meta.update(keys=keys, complete=True)
    write_meta(out, meta)
    return out


def cache_split(ckpt_path: str | os.PathLike, split: str, out_dir: str | os.PathLike, batch_size: int = 256,
                device: str | torch.device = "cpu", progress: bool = True, kind: str | None = None,
                num_workers: int = 0) -> Path:
    """Cache `data.params.<split>` of a first-stage run's own config, encoded by that run's checkpoint
    into latents of `kind` (default: the first stage's default kind)."""
    from ldm.checkpoint import instantiate_from_checkpoint
    from ldm.util import instantiate_from_config

    model, config = instantiate_from_checkpoint(ckpt_path)
    kind = model.resolve_kind(kind)
    data_cfg = (config.get("data") or {}).get("params", {}).get(split)
    if data_cfg is None:
        raise ValueError(f"the config stored in {ckpt_path} has no data.params.{split}")
    dataset = instantiate_from_config(data_cfg, key=f"data.params.{split}")
    return build_cache(model, dataset, out_dir, first_stage_fingerprint(model, ckpt_path, kind=kind), batch_size,
                       device=device, progress=progress, kind=kind, split=split, dataset_config=data_cfg,
                       extra_meta={"checkpoint": str(ckpt_path)}, num_workers=num_workers)


class LatentCache(Dataset):
    """Items with the stored latent keys (`tokens` (h, w) long; `latent`, or `posterior_mean` and
    `posterior_logvar`, (C, h, w) float32) plus `class_label`.

    Caches written before `meta.json` listed its keys (a `tokens` or `latent` entry), or before it
    recorded the split, the data config and skipped items, load unchanged.
    """

    def __init__(self, root: str, expect: Mapping[str, Any] | None = None):
        self.root = Path(root)
        meta_path = self.root / META
        if not meta_path.exists():
            raise FileNotFoundError(f"no latent cache at {root}; build it with scripts/cache_latents.py")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise ValueError(f"the cache at {root} is incomplete; rerun scripts/cache_latents.py to finish it")
        shards = [load_file(str(p)) for p in sorted(self.root.glob("shard-*.safetensors"))]
        if not shards:
            raise ValueError(f"the cache at {root} has no shards; rebuild it with scripts/cache_latents.py")
        shards = [s for s in shards if len(s["class_label"])] or shards[:1]  # a shard of skipped items only is empty
        self.keys = list(self.meta.get("keys") or sorted(k for k in shards[0] if k not in BOOKKEEPING))
        self.data = {k: torch.cat([s[k] for s in shards]) for k in self.keys}
        self.labels = torch.cat([s["class_label"] for s in shards])
        # (N,) each item's index in its data set; None for a cache whose shards did not store it
        self.indices = torch.cat([s["index"] for s in shards]) if all("index" in s for s in shards) else None
        if any(len(v) != self.meta["count"] for v in self.data.values()) or len(self.labels) != self.meta["count"]:
            raise ValueError(f"the cache at {root} has {len(self.labels)} items, its meta.json says {self.meta['count']}")
        if expect is not None:
            self.check_compatible(expect)

    @staticmethod
    def image_dataset_config(root: str, expect: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The config of the image data set the cache at `root` was encoded from (as `cache_split`
        records it), without loading the shards; None if the cache or that record is missing."""
        meta_path = Path(root) / META
        if not meta_path.exists():
            return None
        dataset = json.loads(meta_path.read_text()).get("dataset")
        return dict(dataset) if isinstance(dataset, Mapping) else None

    @property
    def latent_kind(self) -> str:
        return self.meta.get("latent_kind") or self.meta["fingerprint"]["latent_kind"]

    def check_compatible(self, fingerprint: Mapping[str, Any]) -> None:
        """Raise if this cache holds another kind of latent, or was built with a different first stage,
        than `fingerprint` (a prior's `first_stage_fingerprint()`) describes."""
        want = fingerprint.get("latent_kind")
        if want is not None and want != self.latent_kind:
            raise ValueError(f"the latent cache at {self.root} holds {describe_kind(self.latent_kind)} but this prior "
                             f"models {describe_kind(want)}; rebuild it with scripts/cache_latents.py --kind {want}")
        built = self.meta["fingerprint"]
        diffs = []
        for k, v in fingerprint.items():
            if k not in built:
                continue
            old = built[k]
            if k == "latent_shape":
                old, v = list(old), list(v)
                if len(old) < len(v):  # caches of continuous latents that recorded only (h, w)
                    v = v[-len(old):]
            if old != v:
                diffs.append(f"{k}: cache {old!r} vs model {v!r}")
        if diffs:
            raise ValueError(f"the latent cache at {self.root} was built with another first stage ("
                             + "; ".join(diffs) + "); rebuild it with scripts/cache_latents.py")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item: dict[str, Any] = {k: v[i].float() if v.is_floating_point() else v[i].long() for k, v in self.data.items()}
        item["class_label"] = int(self.labels[i])
        return item
