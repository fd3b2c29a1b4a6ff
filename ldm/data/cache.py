"""Latent / token cache: the first stage runs once per image, and the priors train from its output.

A cache folder holds `shard-00000.safetensors`, ... with exactly what the first stage's
`encode_for_prior(x, kind)` returns (tokens `(N, h, w)` int16/int32; `latent` `(N, C, h, w)`;
`posterior_mean` / `posterior_logvar` `(N, C, h, w)` float32), plus `class_label` (N,) and `index`
(N,) dataset indices, and `meta.json` recording the first stage, the latent kind and the stored keys.
Shards are written to a temporary name and renamed, so an interrupted build resumes at the first
missing shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ldm.checkpoint import file_sha256

META = "meta.json"
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


def _describe(kind: str) -> str:
    return "tokens" if kind == "tokens" else f"{kind} latents"


def _storable(t: torch.Tensor, kind: str, model: Any) -> torch.Tensor:
    """Integers (tokens) in the narrowest dtype that holds the codebook; floats as float32."""
    if t.is_floating_point():
        return t.float()
    return t.to(_token_dtype(int(model.n_embed)) if kind == "tokens" else torch.int32)


@torch.no_grad()
def build_cache(model: Any, dataset: Dataset, out_dir: str | os.PathLike, fingerprint: Mapping[str, Any],
                batch_size: int = 256, shard_size: int = 8192, device: str | torch.device = "cpu",
                progress: bool = True, extra_meta: Mapping[str, Any] | None = None,
                kind: str | None = None) -> Path:
    """Encode `dataset` with `model.encode_for_prior(x, kind)` into `out_dir`; resumes an interrupted build.

    `kind` defaults to the first stage's default `latent_kind`.
    """
    kind = model.resolve_kind(kind)
    if fingerprint.get("latent_kind", kind) != kind:
        raise ValueError(f"the fingerprint describes {_describe(fingerprint['latent_kind'])} but the cache is "
                         f"built with kind={kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    meta = {"fingerprint": dict(fingerprint), "count": len(dataset), "shard_size": shard_size,
            "latent_kind": kind, "complete": False, **dict(extra_meta or {})}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") != meta["fingerprint"] or old.get("count") != len(dataset) \
                or old.get("shard_size") != shard_size:
            raise ValueError(f"{out} holds a cache built with another first stage or data set "
                             f"({old.get('fingerprint')}, {old.get('count')} items); use a new folder")
        if old.get("complete"):
            return out
    meta_path.write_text(json.dumps(meta, indent=2))
    model = model.to(device).eval()
    n_shards = (len(dataset) + shard_size - 1) // shard_size
    todo = [s for s in range(n_shards) if not (out / _shard_name(s)).exists()]
    bar = tqdm(total=len(dataset), desc=f"caching {kind} into {out}", disable=not progress,
               initial=(n_shards - len(todo)) * shard_size if todo else len(dataset))
    for s in todo:
        idx = range(s * shard_size, min((s + 1) * shard_size, len(dataset)))
        loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)
        encoded: dict[str, list[torch.Tensor]] = {}
        labels = []
        for batch in loader:
            for name, t in model.encode_for_prior(batch["image"].to(device), kind).items():
                encoded.setdefault(name, []).append(t.cpu())
            labels.append(torch.as_tensor(batch.get("class_label", torch.full((len(batch["image"]),), -1))).long())
            bar.update(len(batch["image"]))
        clash = set(encoded) & set(BOOKKEEPING)
        if clash:
            raise ValueError(f"encode_for_prior returned reserved keys {sorted(clash)}")
        tensors = {name: _storable(torch.cat(ts), kind, model) for name, ts in encoded.items()}
        tensors.update(class_label=torch.cat(labels), index=torch.tensor(list(idx), dtype=torch.long))
        tmp = out / f".{_shard_name(s)}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out / _shard_name(s))
    bar.close()
    if n_shards:
        with safe_open(str(out / _shard_name(0)), framework="pt") as f:
            meta["keys"] = sorted(k for k in f.keys() if k not in BOOKKEEPING)
    meta["complete"] = True
    meta_path.write_text(json.dumps(meta, indent=2))
    return out


def cache_split(ckpt_path: str | os.PathLike, split: str, out_dir: str | os.PathLike, batch_size: int = 256,
                device: str | torch.device = "cpu", progress: bool = True, kind: str | None = None) -> Path:
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
                       device=device, progress=progress, kind=kind,
                       extra_meta={"checkpoint": str(ckpt_path), "split": split, "dataset": data_cfg})


class LatentCache(Dataset):
    """Items with the stored latent keys (`tokens` (h, w) long; `latent`, or `posterior_mean` and
    `posterior_logvar`, (C, h, w) float32) plus `class_label`.

    Caches written before `meta.json` listed its keys (a `tokens` or `latent` entry) load unchanged.
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
        self.keys = list(self.meta.get("keys") or sorted(k for k in shards[0] if k not in BOOKKEEPING))
        self.data = {k: torch.cat([s[k] for s in shards]) for k in self.keys}
        self.labels = torch.cat([s["class_label"] for s in shards])
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
            raise ValueError(f"the latent cache at {self.root} holds {_describe(self.latent_kind)} but this prior "
                             f"models {_describe(want)}; rebuild it with scripts/cache_latents.py --kind {want}")
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
