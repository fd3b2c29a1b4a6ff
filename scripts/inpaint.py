"""Inpainting grids of a trained prior on its evaluation split: for each mask, a row of test images, a row of
what the prior is shown (the hole in grey) and rows of completions (different seeds).

    python scripts/inpaint.py -r logs/<prior run>/checkpoints/last.ckpt --mask upper,centre -n 8 --samples 3 \
        --out outputs/inpaint.png
    python scripts/inpaint.py -r logs/<prior run>/checkpoints/last.ckpt --mask centre guidance_scale=2

Sampler settings follow as key=value, as in sample.py (`sample.py -r <ckpt> --list-options` lists them); the
images' class labels condition a class-conditional prior.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, needs, output_path, run, sampler_kwargs  # noqa: E402
from ldm.masks import NAMED_MASKS, named_mask  # noqa: E402
from ldm.metrics.eval_data import image_split  # noqa: E402
from ldm.metrics.prior_eval import dataset_images  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, help="prior checkpoint (or an ImageBART sampling config)")
    p.add_argument("--mask", default="upper,centre", help=f"comma-separated, of {', '.join(NAMED_MASKS)}")
    p.add_argument("-n", "--num", type=int, default=8, help="test images (columns)")
    p.add_argument("--samples", type=int, default=2, help="completions per image (rows per mask)")
    p.add_argument("--split", default="test", help="the checkpoint's data split the images come from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options, plus `sampler_kw` from everything the parser does not know (key=value)."""
    args, rest = build_parser().parse_known_args(argv)
    args.sampler_kw = sampler_kwargs(rest)
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    at_least("-n", args.num)
    at_least("--samples", args.samples)
    masks = [m.strip() for m in args.mask.split(",") if m.strip()]
    if not masks or any(m not in NAMED_MASKS for m in masks):
        raise ValueError(f"--mask: choose from {', '.join(NAMED_MASKS)}, got {args.mask!r}")
    out = output_path(args.out or Path(args.resume).with_name(f"inpaint_seed{args.seed}.png"), IMAGE_SUFFIXES)
    prior, config = instantiate_from_checkpoint(args.resume, check_class=needs("prior", "inpaint.py"))
    options = prior.check_sampler_options(args.sampler_kw, mode="inpaint")
    try:
        dataset, _ = image_split(config, args.split)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    images = dataset_images(dataset, args.num).to(prior.device)
    labels = torch.tensor([int(dataset[i]["class_label"]) for i in range(len(images))]) if prior.num_classes else None
    rows = []
    for name in masks:
        mask = named_mask(name, *images.shape[:1], *images.shape[2:]).to(images)
        rows += [images, images * mask]  # the hole shows as 0 (grey in [-1, 1])
        for k in range(args.samples):
            g = torch.Generator(device=prior.device).manual_seed(args.seed + k)
            rows.append(prior.inpaint(images, mask, cond=labels, generator=g, **options))
    grid = torchvision.utils.make_grid(torch.cat([r.float().cpu() for r in rows]), nrow=len(images))
    out.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image((grid + 1) / 2, out)
    print(f"wrote {out} ({len(masks)} masks x {len(images)} images x {args.samples} completions)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
