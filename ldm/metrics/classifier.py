"""The project's Fashion-MNIST yardstick: a small CNN whose penultimate features define FD_fmnist and
whose predictions give the conditional accuracy of class-conditional samples.

Inception and VGG weights cannot be assumed, so this classifier, trained by
`scripts/train_classifier.py` and stored in `data/`, replaces them for Fashion-MNIST. Numbers
computed with it are named FD_fmnist / rFD_fmnist, never FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLASSIFIER_PATH = REPO_ROOT / "data" / "fmnist_classifier.safetensors"
FEATURE_DIM = 128


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FMNISTClassifier(nn.Module):
    """(B, 1, 32, 32) in [-1, 1] -> logits (B, 10); `features` gives the (B, 128) penultimate layer."""

    def __init__(self, num_classes: int = 10, width: int = 32, dropout: float = 0.3):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv(1, w), *_conv(w, w), nn.MaxPool2d(2),  # 16x16
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *_conv(2 * w, FEATURE_DIM), *_conv(FEATURE_DIM, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Accept 28x28 (padded to 32) or 32x32 grayscale images in [-1, 1]."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"the Fashion-MNIST classifier takes (B, 1, 32, 32) grayscale images, got {tuple(x.shape)}")
        if x.shape[-2:] == (28, 28):
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        if x.shape[-2:] != (32, 32):
            raise ValueError(f"the Fashion-MNIST classifier takes 32x32 (or 28x28) images, got {tuple(x.shape[-2:])}")
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: str | Path = DEFAULT_CLASSIFIER_PATH, device: str | torch.device = "cpu") -> FMNISTClassifier:
    """The trained yardstick, in eval mode."""
    from ldm.checkpoint import load_into, load_state_dict

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Fashion-MNIST classifier at {path}; train it with `python scripts/train_classifier.py`")
    net = FMNISTClassifier()
    load_into(net, load_state_dict(path), source=str(path))
    return net.to(device).eval()


@torch.no_grad()
def classifier_outputs(classifier: FMNISTClassifier, images: torch.Tensor, batch_size: int = 500
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, 128) and predicted labels (N,) of images in [-1, 1]."""
    device = next(classifier.parameters()).device
    feats, preds = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk.to(device))
        feats.append(f.cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def conditional_accuracy(classifier: FMNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the classifier assigns to the class they were generated for."""
    _, preds = classifier_outputs(classifier, images)
    return float((preds == labels.cpu()).float().mean())
