"""The project's Fashion-MNIST yardstick: a small CNN whose penultimate features define FD_fmnist and
whose predictions give the conditional accuracy of class-conditional samples.

Inception and VGG weights cannot be downloaded here, so this classifier, trained by
`scripts/train_classifier.py` and stored in `data/`, stands in for them on Fashion-MNIST. Numbers
computed with it are named FD_fmnist / rFD_fmnist, never FID.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
# Resolved against the package location, so scripts work from any working directory.
DEFAULT_CLASSIFIER_PATH = REPO_ROOT / "data" / "fmnist_classifier.safetensors"
FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SIZE = 32


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FMNISTClassifier(nn.Module):
    """(B, 1, 32, 32) in [-1, 1] -> logits (B, 10); `features` is the (B, 128) penultimate layer.

    Three stages of two 3x3 conv/BatchNorm/ReLU blocks (32, 64, 128 channels; 32 -> 16 -> 8 pixels),
    global average pooling, dropout and a linear head: ~0.29M parameters, ~1.2 MB of float32.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32, dropout: float = 0.3):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_conv(1, w), *_conv(w, w), nn.MaxPool2d(2),  # (B, w, 16, 16)
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, 8, 8)
            *_conv(2 * w, FEATURE_DIM), *_conv(FEATURE_DIM, FEATURE_DIM),  # (B, 128, 8, 8)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 128)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.feature_dim = FEATURE_DIM

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Check the input: grayscale 32x32 in [-1, 1]; raw 28x28 Fashion-MNIST is padded with -1 to 32x32."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(
                f"the Fashion-MNIST classifier takes grayscale images (B, 1, 32, 32) in [-1, 1], got shape {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) == (28, 28):
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (B, 1, 32, 32), as FashionMNIST(resize_mode="pad")
        if tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"the Fashion-MNIST classifier takes 32x32 (or 28x28) images, got {tuple(x.shape[-2:])}; "
                "resize them to 32x32 first"
            )
        return x.float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) penultimate features: the embedding behind FD_fmnist."""
        return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10) logits."""
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> FMNISTClassifier:
    """The trained yardstick from a safetensors file (default: the project's weights), in eval mode."""
    from ldm.checkpoint import load_into, load_state_dict

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    if not path.exists():
        raise FileNotFoundError(
            f"no Fashion-MNIST classifier weights at {path}; train them with "
            f"`python scripts/train_classifier.py --out {path}` (the default writes {DEFAULT_CLASSIFIER_PATH})"
        )
    net = FMNISTClassifier()
    load_into(net, load_state_dict(path), source=str(path))
    return net.to(device).eval()


def classifier_hash(net: nn.Module, length: int = 16) -> str:
    """Hex digest of a network's weights: what cached reference statistics record about their extractor."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:length]


@torch.no_grad()
def classifier_outputs(classifier: FMNISTClassifier, images: torch.Tensor, batch_size: int = 500
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, 128) and predicted labels (N,) of images (N, 1, 32, 32) in [-1, 1]."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()  # BatchNorm running statistics; dropout off
    try:
        feats, preds = [], []
        for chunk in images.split(batch_size):
            f = classifier.features(chunk.to(device))  # (b, 128)
            feats.append(f.cpu())
            preds.append(classifier.head(f).argmax(1).cpu())
    finally:
        classifier.train(was_training)
    if not feats:
        return torch.zeros(0, FEATURE_DIM), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(preds)


def conditional_accuracy(classifier: FMNISTClassifier, images: torch.Tensor, labels: torch.Tensor | list[int],
                         batch_size: int = 500) -> float:
    """Fraction of images the classifier assigns to the class they were generated for (or labelled with)."""
    labels = torch.as_tensor(labels, dtype=torch.long).cpu().flatten()
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("conditional_accuracy needs at least one image")
    _, preds = classifier_outputs(classifier, images, batch_size)
    return float((preds == labels).double().mean())
