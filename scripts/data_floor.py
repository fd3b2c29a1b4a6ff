"""The data's own FD floor: the two halves of the test split against each other, and the test split against
the training split, scored as `evaluate.py` scores samples (FD_fmnist, KID, IS, precision / recall / density /
coverage, the classifier's accuracy). A prior cannot be expected to beat these numbers.

    python scripts/data_floor.py -r data/fmnist_vq.safetensors --out results/fmnist/eval/floor.json
    python scripts/data_floor.py -r data/fmnist_vq.safetensors --reference-split validation --limit 2000 \
        --out floor_validation.json

The image splits are those of the checkpoint's stored data config (any checkpoint of the project: a first
stage, or a prior through its latent cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import config_from_checkpoint  # noqa: E402
from ldm.cli import at_least, output_path, run  # noqa: E402
from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, load_classifier  # noqa: E402
from ldm.metrics.distribution import KID_SUBSETS  # noqa: E402
from ldm.metrics.eval_data import image_split  # noqa: E402
from ldm.metrics.features import ClassifierFeatures  # noqa: E402
from ldm.metrics.floor import floor_scores, images_and_labels  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, help="a checkpoint whose stored config names the data")
    p.add_argument("--split", default="test", help="the split cut in two halves")
    p.add_argument("--reference-split", default="train", help="the split the whole --split is compared with")
    p.add_argument("--limit", type=int, default=None, help="at most this many images of each split")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER_PATH))
    p.add_argument("--kid-subsets", type=int, default=KID_SUBSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    at_least("--limit", args.limit)
    at_least("--kid-subsets", args.kid_subsets)
    out = output_path(args.out, (".json",))
    config = config_from_checkpoint(args.resume)
    test, test_source = image_split(config, args.split)
    reference, ref_source = image_split(config, args.reference_split)
    extractors = [ClassifierFeatures(load_classifier(args.classifier, "cpu"))]
    scores = floor_scores(images_and_labels(test, args.limit), images_and_labels(reference, args.limit),
                          extractors, args.kid_subsets, args.seed)
    result = {"checkpoint": args.resume, "split": args.split, "split_source": test_source,
              "reference_split": args.reference_split, "reference_source": ref_source, "features": extractors[0].name,
              "preprocessing": "uint8", **scores}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for k in ("test_halves", "test_vs_train"):
        print(f"{k}: FD_fmnist {scores[k]['FD_fmnist']:.4g} ({scores[k]['images']} against "
              f"{scores[k]['reference_images']} images)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
