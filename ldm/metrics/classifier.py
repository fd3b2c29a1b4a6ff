"""The project's Fashion-MNIST yardstick: a small CNN whose penultimate features define FD_fmnist and
whose predictions give the conditional accuracy of class-conditional samples.

Inception and VGG weights cannot be downloaded here, so this classifier, trained by
`scripts/train_classifier.py` and stored in `data/`, stands in for them on Fashion-MNIST. Numbers
computed with it are named FD_fmnist / rFD_fmnist, never FID.

Every image reaches the network through `FMNISTClassifier.prepare`, the one place that adapts data to
it: float32, grayscale (RGB by ITU-R BT.601 luma), 32x32 (28x28 padded with background as the
training data was, any other size resized bilinearly with antialiasing). Other data can be scored that
way, but the numbers then measure distance in a Fashion-MNIST classifier's features: comparable among
runs on the same data, not with Fashion-MNIST results. The classifier always runs in float32, also
inside an autocast region (`scripts/evaluate.py --bf16` speeds up the prior only).
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
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
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def float32_region(device: torch.device | str) -> AbstractContextManager:
    """Switch off any autocast the caller runs in: the yardstick's numbers never depend on it."""
    device_type = torch.device(device).type
    return torch.autocast(device_type if device_type in ("cuda", "cpu", "xpu", "mps") else "cpu", enabled=False)


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
        """Images (B, 1 or 3, H, W) in [-1, 1] to the classifier's input (B, 1, 32, 32) float32.

        RGB becomes luma; 28x28 (raw Fashion-MNIST) is padded with -1 to 32x32 as
        `FashionMNIST(resize_mode="pad")` does; any other size is resized (bilinear, antialiased).
        """
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError("the Fashion-MNIST classifier takes grayscale or RGB images (B, 1 or 3, H, W) in "
                             f"[-1, 1], got shape {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 3:
            x = (x * x.new_tensor(LUMA)[None, :, None, None]).sum(1, keepdim=True)  # (B, 1, H, W)
        if tuple(x.shape[-2:]) == (28, 28):
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (B, 1, 32, 32), as FashionMNIST(resize_mode="pad")
        elif tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                              antialias=True).clamp(-1.0, 1.0)
        return x.contiguous()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) float32 penultimate features: the embedding behind FD_fmnist."""
        with float32_region(x.device):
            return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10) float32 logits."""
        with float32_region(x.device):
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
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()[:length]


@torch.no_grad()
def classifier_outputs(classifier: FMNISTClassifier, images: torch.Tensor, batch_size: int = 500
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, 128) float32 and predicted labels (N,) of images (N, C, H, W) in [-1, 1]
    (see `FMNISTClassifier.prepare`); float32 whatever autocast the caller runs in."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()  # BatchNorm running statistics; dropout off
    try:
        feats, preds = [], []
        with float32_region(device):
            for chunk in images.split(batch_size):
                f = classifier.features(chunk.to(device).float())  # (b, 128)
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
