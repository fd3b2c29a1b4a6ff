"""Pluggable feature extractors for the distribution metrics, and the one preprocessing every set gets.

Preprocessing, the same for samples, reconstructions and reference images (mismatched preprocessing
is the usual reason FID numbers disagree):

1. **uint8 quantisation.** Images in [-1, 1] are clamped and rounded to 8 bits,
   `round((x + 1) * 127.5)`, as writing them to PNG would: a model gains nothing from values between
   two grey levels, and data read from 8-bit files (Fashion-MNIST: `v / 127.5 - 1`) round-trips exactly.
2. **The extractor's own resizing**, inside the extractor:
   - `fmnist` (offline, the default): the project's Fashion-MNIST classifier
     (`ldm.metrics.classifier`): uint8 -> [-1, 1], RGB -> BT.601 luma, 28x28 padded to 32x32 with
     background, any other size resized bilinearly with antialiasing. 128 penultimate features
     (FD_fmnist, KID_fmnist, precision / recall / density / coverage) and 10 logits (IS_fmnist,
     conditional accuracy).
   - `inception`: torch-fidelity's `inception-v3-compat` (the TF FID network): uint8 RGB (grayscale
     repeated over three channels) resized to 299x299 by torch-fidelity's TF1-compatible bilinear
     interpolation (no antialiasing), 2048 pool features (FID, KID, precision / recall) and the
     1008 unbiased logits (IS). Its weights download on first use; `weights_path` loads a local copy.
     Numbers are comparable with published FIDs only when the reference images went through the same
     steps at the same resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ldm.metrics.classifier import FMNISTClassifier, classifier_hash, float32_region, load_classifier

FIDELITY_FMNIST = "fmnist-classifier"  # the classifier's name in torch-fidelity's registry


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 in [0, 255], rounded to the nearest grey level (clamped first)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1], the inverse the data loaders use (`v / 127.5 - 1`)."""
    return images.float() / 127.5 - 1.0


class FeatureExtractor(Protocol):
    """What the evaluation needs of an extractor: a name that identifies its weights (stored features are
    reused only under the same name), metric names, and features and logits of uint8 images."""

    name: str
    fd_key: str  # the Fréchet distance's name: FD_fmnist or FID
    suffix: str  # added to KID / IS: "_fmnist" for the classifier, "" for Inception

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, C, H, W) -> {"features": (B, D) float32, "logits": (B, K) float32} on the CPU."""
        ...


class ClassifierFeatures:
    """The project's Fashion-MNIST classifier as the extractor: offline, named honestly (FD_fmnist)."""

    fd_key, suffix = "FD_fmnist", "_fmnist"

    def __init__(self, classifier: FMNISTClassifier, batch_size: int = 500):
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.name = f"fmnist-{classifier_hash(classifier)}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        device = next(self.classifier.parameters()).device
        feats, logits = [], []
        with float32_region(device):
            for chunk in images.split(self.batch_size):
                f = self.classifier.features(from_uint8(chunk.to(device)))  # (b, 128)
                feats.append(f.cpu())
                logits.append(self.classifier.head(f).cpu())  # (b, 10); dropout is off in eval
        if not feats:
            return {"features": torch.zeros(0, self.classifier.feature_dim), "logits": torch.zeros(0, 10)}
        return {"features": torch.cat(feats), "logits": torch.cat(logits)}


class InceptionFeatures:
    """torch-fidelity's Inception-v3 (the TF FID network); weights download on first use unless
    `weights_path` names a local copy. Refused with one sentence when they cannot be had."""

    fd_key, suffix = "FID", ""

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import (
                URL_INCEPTION_V3,
                FeatureExtractorInceptionV3,
            )
        except ImportError as e:
            raise ValueError("--features inception needs torch-fidelity (pip install -e '.[metrics]')") from e
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=None if weights_path is None
                                              else str(weights_path), verbose=False)
        except Exception as e:  # no network (URLError is an OSError), a file that is not the weights, ...
            source = weights_path or URL_INCEPTION_V3
            raise ValueError(f"cannot load the Inception weights from {source} ({type(e).__name__}: {e}); "
                             "download them where a network is available and pass their path, or score with "
                             "the offline Fashion-MNIST classifier (--features fmnist)") from None
        self.net = net.to(device)
        self.batch_size = batch_size
        self.name = "inception-v3-compat" if weights_path is None else f"inception-v3:{Path(weights_path).name}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        device = next(self.net.parameters()).device
        feats, logits = [], []
        with float32_region(device):
            for chunk in images.split(self.batch_size):
                if chunk.shape[1] == 1:
                    chunk = chunk.expand(-1, 3, -1, -1)  # grayscale as RGB, (b, 3, H, W) uint8
                f, lg = self.net(chunk.contiguous().to(device))  # (b, 2048), (b, 1008)
                feats.append(f.cpu())
                logits.append(lg.cpu())
        return {"features": torch.cat(feats), "logits": torch.cat(logits)}


def register_classifier_with_fidelity() -> str:
    """Register the project's classifier in torch-fidelity's registry (once) and return its name, so
    `torch_fidelity.calculate_metrics(feature_extractor=FIDELITY_FMNIST, ...)` runs torch-fidelity's own
    pipeline on it (`feature_extractor_weights_path` picks other classifier weights). The tests check
    our metrics against it."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if FIDELITY_FMNIST in FEATURE_EXTRACTORS_REGISTRY:
        return FIDELITY_FMNIST

    class FidelityFMNIST(FeatureExtractorBase):
        """uint8 (B, C, H, W) -> ("128" penultimate features, "logits"), as `ClassifierFeatures`."""

        def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                     **kwargs: object):
            super().__init__(name, features_list)
            self.classifier = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return "128", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": "logits", "fid": "128", "kid": "128", "prc": "128"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            f = self.classifier.features(from_uint8(x))
            out = {"128": f, "logits": self.classifier.head(f)}
            return tuple(out[k] for k in self.features_list)

    register_feature_extractor(FIDELITY_FMNIST, FidelityFMNIST)
    return FIDELITY_FMNIST


def build_extractor(kind: str, classifier: FMNISTClassifier, inception_weights: str | Path | None = None,
                    device: str | torch.device = "cpu") -> FeatureExtractor:
    """`fmnist` (the classifier, offline) or `inception` (torch-fidelity)."""
    if kind == "fmnist":
        return ClassifierFeatures(classifier)
    if kind == "inception":
        return InceptionFeatures(inception_weights, device=device)
    raise ValueError(f"--features must be fmnist or inception, got {kind!r}")
