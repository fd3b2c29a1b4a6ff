"""The image split an evaluation compares against, found from a checkpoint's stored config.

A first stage's config names its image data sets directly. A prior's `data.params.<split>` usually
names a latent cache; the cache's `meta.json` records the image data set it was encoded from, and the
first stage's own checkpoint (its `first_stage_config.params.ckpt_path`) carries its data config too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from ldm.data.skipped import is_skipped
from ldm.util import get_obj_from_str, instantiate_from_config


def _split_config(config: Mapping[str, Any], split: str) -> Mapping[str, Any] | None:
    return ((config.get("data") or {}).get("params") or {}).get(split)


def image_split_config(config: Mapping[str, Any], split: str = "test") -> tuple[dict[str, Any], str]:
    """The config of the image data set behind `data.params.<split>` and where it was found."""
    data_cfg = _split_config(config, split)
    if data_cfg is None:
        raise ValueError(f"the stored config has no data.params.{split}; choose a split it has "
                         f"({', '.join(((config.get('data') or {}).get('params') or {}).keys()) or 'none'})")
    cls = get_obj_from_str(data_cfg["target"], key=f"data.params.{split}.target")
    wrapped = getattr(cls, "wrapped_dataset_param", None)
    if wrapped:  # captions made from labels around a data set: the images are that data set's
        inner = {**config, "data": {"params": {split: (data_cfg.get("params") or {})[wrapped]}}}
        return image_split_config(inner, split)
    source_of = getattr(cls, "image_dataset_config", None)
    if source_of is None:  # an image data set itself
        return dict(data_cfg), f"data.params.{split}"
    params = dict(data_cfg.get("params") or {})
    tried = [f"data.params.{split} is a latent cache ({params.get('root')}) without a record of its images"]
    image_cfg = source_of(**params)
    if image_cfg is not None:
        return image_cfg, f"the images the latent cache {params.get('root')} was built from"
    ckpt = (((config.get("model") or {}).get("params") or {}).get("first_stage_config") or {}).get(
        "params", {}).get("ckpt_path")
    if ckpt:
        from ldm.checkpoint import CheckpointError, config_from_checkpoint

        try:
            image_cfg = _split_config(config_from_checkpoint(ckpt), split)
        except (OSError, CheckpointError) as e:
            tried.append(f"the first stage checkpoint {ckpt}: {e}")
        else:
            if image_cfg is not None:
                return dict(image_cfg), f"data.params.{split} of the first stage checkpoint {ckpt}"
            tried.append(f"the first stage checkpoint {ckpt} has no data.params.{split}")
    raise ValueError(f"cannot find the image data set of split {split!r}: " + "; ".join(tried))


def image_split(config: Mapping[str, Any], split: str = "test") -> tuple[Dataset, str]:
    """The image data set of `split` (items with an `image`) a checkpoint's config describes, and its source."""
    image_cfg, source = image_split_config(config, split)
    dataset = instantiate_from_config(image_cfg, key=f"{source} ({split})")
    if len(dataset) == 0 or (not is_skipped(first := dataset[0]) and "image" not in first):
        raise ValueError(f"{source} gives no images (items need an 'image' entry)")
    return dataset, source


def class_prompts(config: Mapping[str, Any], split: str = "test") -> list[str] | None:
    """The caption of each class when `data.params.<split>` makes captions from class labels
    (`ldm.data.captions.ClassCaptions`), so a text-conditioned prior is scored per class; else None."""
    data_cfg = _split_config(config, split) or {}
    cls = get_obj_from_str(data_cfg["target"], key=f"data.params.{split}.target") if "target" in data_cfg else None
    prompts = getattr(cls, "prompts_from_config", None)
    return prompts(**dict(data_cfg.get("params") or {})) if prompts else None
