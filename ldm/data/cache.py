"""Latent / token cache: the first stage runs once per image, and the priors train from its output.

A cache folder holds `shard-00000.safetensors`, ... (`tokens` int16/int32 (N, h, w) or `latent`
float (N, C, h, w), `class_label` (N,), `index` (N,) dataset indices) and `meta.json` recording
which first stage built it. Shards are written to a temporary name and renamed, so an
interrupted build resumes at the first missing shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ldm.checkpoint import file_sha256

META = "meta.json"


def first_stage_fingerprint(model: Any, ckpt_path: str | os.PathLike | None = None,
                            latent_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """What identifies the latents a first stage produces: kind, grid, codebook size, weights hash."""
    fp: dict[str, Any] = {"latent_kind": model.latent_kind,
                          "latent_shape": list(latent_shape or model.latent_shape())}
    if model.latent_kind == "tokens":
        fp["n_embed"] = int(model.n_embed)
    if ckpt_path and os.path.exists(ckpt_path):
        fp["ckpt_sha256"] = file_sha256(ckpt_path)
    return fp


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _token_dtype(n_embed: int) -> torch.dtype:
    return torch.int16 if n_embed <= 32767 else torch.int32


@torch.no_grad()
def build_cache(model: Any, dataset: Dataset, out_dir: str | os.PathLike, fingerprint: Mapping[str, Any],
                batch_size: int = 256, shard_size: int = 8192, device: str | torch.device = "cpu",
                progress: bool = True, extra_meta: Mapping[str, Any] | None = None) -> Path:
    """Encode `dataset` with `model.encode_to_latent` into `out_dir`; resumes an interrupted build."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    meta = {"fingerprint": dict(fingerprint), "count": len(dataset), "shard_size": shard_size,
            "latent_kind": model.latent_kind, "complete": False, **dict(extra_meta or {})}
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
    bar = tqdm(total=len(dataset), desc=f"caching into {out}", disable=not progress,
               initial=(n_shards - len(todo)) * shard_size if todo else len(dataset))
    for s in todo:
        idx = range(s * shard_size, min((s + 1) * shard_size, len(dataset)))
        loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False)
        latents, labels = [], []
        for batch in loader:
            latents.append(model.encode_to_latent(batch["image"].to(device)).cpu())
            labels.append(torch.as_tensor(batch.get("class_label", torch.full((len(batch["image"]),), -1))).long())
            bar.update(len(batch["image"]))
        z = torch.cat(latents)
        tensors = {"class_label": torch.cat(labels), "index": torch.tensor(list(idx), dtype=torch.long)}
        if model.latent_kind == "tokens":
            tensors["tokens"] = z.to(_token_dtype(int(model.n_embed)))
        else:
            tensors["latent"] = z.float()
        tmp = out / f".{_shard_name(s)}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out / _shard_name(s))
    bar.close()
    meta["complete"] = True
    meta_path.write_text(json.dumps(meta, indent=2))
    return out


def cache_split(ckpt_path: str | os.PathLike, split: str, out_dir: str | os.PathLike, batch_size: int = 256,
                device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Cache `data.params.<split>` of a first-stage run's own config, encoded by that run's checkpoint."""
    from ldm.checkpoint import instantiate_from_checkpoint
    from ldm.util import instantiate_from_config

    model, config = instantiate_from_checkpoint(ckpt_path)
    data_cfg = (config.get("data") or {}).get("params", {}).get(split)
    if data_cfg is None:
        raise ValueError(f"the config stored in {ckpt_path} has no data.params.{split}")
    dataset = instantiate_from_config(data_cfg, key=f"data.params.{split}")
    return build_cache(model, dataset, out_dir, first_stage_fingerprint(model, ckpt_path), batch_size,
                       device=device, progress=progress,
                       extra_meta={"checkpoint": str(ckpt_path), "split": split, "dataset": data_cfg})


class LatentCache(Dataset):
    """Items `{"tokens": (h, w) long}` or `{"latent": (C, h, w)}`, plus `class_label`."""

    def __init__(self, root: str, expect: Mapping[str, Any] | None = None):
        self.root = Path(root)
        meta_path = self.root / META
        if not meta_path.exists():
            raise FileNotFoundError(f"no latent cache at {root}; build it with scripts/cache_latents.py")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise ValueError(f"the cache at {root} is incomplete; rerun scripts/cache_latents.py to finish it")
        shards = [load_file(str(p)) for p in sorted(self.root.glob("shard-*.safetensors"))]
        self.key = "tokens" if self.meta["latent_kind"] == "tokens" else "latent"
        self.data = torch.cat([s[self.key] for s in shards])
        self.labels = torch.cat([s["class_label"] for s in shards])
        if len(self.data) != self.meta["count"]:
            raise ValueError(f"the cache at {root} has {len(self.data)} items, its meta.json says {self.meta['count']}")
        if expect is not None:
            self.check_compatible(expect)

    def check_compatible(self, fingerprint: Mapping[str, Any]) -> None:
        """Raise if this cache was built with a different first stage than `fingerprint` describes."""
        built = self.meta["fingerprint"]
        diffs = [f"{k}: cache {built.get(k)!r} vs model {v!r}" for k, v in fingerprint.items()
                 if k in built and built[k] != v]
        if diffs:
            raise ValueError(f"the latent cache at {self.root} was built with another first stage ("
                             + "; ".join(diffs) + "); rebuild it with scripts/cache_latents.py")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        z = self.data[i]
        return {self.key: z.long() if self.key == "tokens" else z.float(), "class_label": int(self.labels[i])}
