"""Captions made from class labels ("a photo of a sandal"), for text-conditioned priors on a labelled data set
or latent cache without captions of its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from ldm.util import instantiate_from_config

CLASS_NAMES = {"fmnist": ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                          "ankle boot")}


def _names(class_names: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(class_names, str):
        if class_names not in CLASS_NAMES:
            raise ValueError(f"class_names: no built-in names for {class_names!r}; give a list or one of "
                             f"{sorted(CLASS_NAMES)}")
        return CLASS_NAMES[class_names]
    return tuple(class_names)


class ClassCaptions(Dataset):
    """Items of `dataset` (a config) with `caption` = `template` filled with the class's name."""

    wrapped_dataset_param = "dataset"  # where the evaluation finds the images behind the captions

    def __init__(self, dataset: Mapping[str, Any], template: str = "a photo of a {}",
                 class_names: str | Sequence[str] = "fmnist"):
        self.dataset = instantiate_from_config(dataset, key="dataset")
        if "{}" not in template:
            raise ValueError(f"template must hold {{}} for the class name, got {template!r}")
        self.template, self.class_names = template, _names(class_names)

    @staticmethod
    def prompts_from_config(dataset: Any = None, template: str = "a photo of a {}",
                            class_names: str | Sequence[str] = "fmnist") -> list[str]:
        """The caption of each class, in class order, from this data set's config (no data read)."""
        return [template.format(name) for name in _names(class_names)]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # what the wrapped data set offers (check_compatible, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if item is None:
            return item
        label = int(item["class_label"])
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"class {label} has no name (class_names has {len(self.class_names)})")
        return {**item, "caption": self.template.format(self.class_names[label])}
