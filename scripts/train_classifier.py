"""Train the Fashion-MNIST classifier that defines FD_fmnist and conditional accuracy.

    python scripts/train_classifier.py            # writes data/fmnist_classifier.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import export_safetensors  # noqa: E402
from ldm.cli import run  # noqa: E402
from ldm.data.fmnist import FashionMNIST  # noqa: E402
from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, FMNISTClassifier  # noqa: E402


def as_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = FashionMNIST(split=split, size=32)
    x = torch.from_numpy(ds.images).float().div(127.5).sub(1.0)[:, None]  # (N, 1, 28, 28)
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.from_numpy(ds.labels.astype("int64"))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and horizontal flips."""
    b = x.shape[0]
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[:, :, dy:dy + 32, dx:dx + 32]


@torch.no_grad()
def accuracy(net: FMNISTClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    correct = sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000)))
    return correct / len(y)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(DEFAULT_CLASSIFIER_PATH))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    xtr, ytr = as_tensors("train")
    xva, yva = as_tensors("validation")
    xte, yte = as_tensors("test")
    net = FMNISTClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch_size, shuffle=True, generator=g, drop_last=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(loader))
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}")
        for xb, yb in bar:
            loss = F.cross_entropy(net(augment(xb, g)), yb, label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"epoch {epoch + 1}: validation accuracy {accuracy(net, xva, yva):.4f}", flush=True)
    test_acc = accuracy(net, xte, yte)
    minutes = (time.time() - t0) / 60
    print(f"test accuracy {test_acc:.4f} after {args.epochs} epochs ({minutes:.1f} min)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    export_safetensors(net.state_dict(), args.out, metadata={"test_accuracy": f"{test_acc:.4f}", "epochs": args.epochs,
                                                             "seed": args.seed})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
