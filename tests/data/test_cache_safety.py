"""A latent cache is never silently wrong: a build into a folder that holds anything else is refused and
leaves the folder as it was, an interrupted build of the same thing resumes, and unreadable images are
left out under their true index and recorded, never replaced by another image."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ldm.cli import run
from ldm.data.cache import LatentCache, build_cache
from ldm.data.cache_meta import summary
from ldm.data.image_folder import ImageFolder
from ldm.first_stage.models import VQModel
from tests.data.test_cache import FP, IDENTITY, CountingVQ, FMNISTLike, Images, tiny_vq
from tests.data.test_image_folder import make_folder

VALIDATION = {"target": "ldm.data.fmnist.FashionMNIST", "params": {"split": "validation", "size": 32}}
TEST = {"target": "ldm.data.fmnist.FashionMNIST", "params": {"split": "test", "size": 32}}
BAD = ("empty.jpg", "huge.png", "text.png", "truncated.jpg")
REASONS = {"too_large": 1, "truncated": 1, "unreadable": 2}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(build, out: Path) -> str:
    """The error of a refused build, after checking that it encoded nothing and changed nothing in `out`."""
    before, model = snapshot(out), CountingVQ()
    with pytest.raises(ValueError) as e:
        build(model)
    assert model.calls == 0 and snapshot(out) == before
    return str(e.value)


def test_another_split_is_refused(tmp_path):
    """The reported bug: both splits have 10 items, and the test build used to say "cache ready"."""
    out = tmp_path / "x"
    build_cache(CountingVQ(), Images(), out, FP, progress=False, split="validation", dataset_config=VALIDATION)
    message = refusal(lambda m: build_cache(m, Images(), out, FP, progress=False, split="test",
                                            dataset_config=TEST), out)
    assert message == f"{out} holds the validation split; refusing to build the test split into it: choose another --out"


def test_another_data_config_first_stage_or_kind_is_refused(tmp_path):
    out = tmp_path / "x"
    build_cache(CountingVQ(), Images(), out, FP, progress=False, split="test", dataset_config=TEST)
    other_data = {"target": "ldm.data.image_folder.ImageFolder", "params": {"root": "data/x", "size": 32}}
    assert refusal(lambda m: build_cache(m, Images(), out, FP, progress=False, split="test",
                                         dataset_config=other_data), out) == (
        f"{out} holds data set {json.dumps(TEST, sort_keys=True)}; refusing to build data set "
        f"{json.dumps(other_data, sort_keys=True)} into it: choose another --out")
    assert refusal(lambda m: build_cache(m, Images(), out, {**FP, "ckpt_sha256": "def"}, progress=False, split="test",
                                         dataset_config=TEST), out) == (
        f"{out} holds latents of first stage ckpt_sha256='abc'; refusing to build latents of first stage "
        "ckpt_sha256='def' into it: choose another --out")
    assert refusal(lambda m: build_cache(m, Images(12), out, {**FP, "n_embed": 16}, progress=False,
                                         split="validation", dataset_config=VALIDATION), out) == (
        f"{out} holds latents of first stage n_embed=8 and the test split; refusing to build latents of first "
        "stage n_embed=16 and the validation split into it: choose another --out")
    assert refusal(lambda m: build_cache(m, Images(12), out, FP, progress=False, split="test", dataset_config=TEST),
                   out) == (f"{out} holds a data set of 10 items; refusing to build a data set of 12 items into it: "
                            "choose another --out")

    model, ds = tiny_vq(), FMNISTLike()
    from ldm.data.cache import first_stage_fingerprint

    build_cache(model, ds, tmp_path / "z", first_stage_fingerprint(model), progress=False, split="test")
    assert refusal(lambda _: build_cache(model, ds, tmp_path / "z", first_stage_fingerprint(model, kind="continuous"),
                                         progress=False, split="test", kind="continuous"), tmp_path / "z") == (
        f"{tmp_path / 'z'} holds tokens; refusing to build continuous latents into it: choose another --out")


def test_a_folder_of_other_files_is_refused(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    build_cache(CountingVQ(), Images(), out, FP, progress=False)  # an empty folder is fine
    other = tmp_path / "photos"
    other.mkdir()
    for name in ("a.png", "b.png", "c.png", "notes.txt"):
        (other / name).write_text(name)
    assert refusal(lambda m: build_cache(m, Images(), other, FP, progress=False, split="test"), other) == (
        f"{other} holds files that are not a latent cache (a.png, b.png, c.png and 1 more; no meta.json); refusing "
        "to build the test split into it: choose another --out")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "meta.json").write_text("{not json")
    assert refusal(lambda m: build_cache(m, Images(), tmp_path / "y", FP, progress=False, split="test"),
                   tmp_path / "y") == (
        f"{tmp_path / 'y' / 'meta.json'} is not the record of a latent cache (Expecting property name enclosed in "
        f"double quotes: line 1 column 2 (char 1)); refusing to build the test split into {tmp_path / 'y'}: "
        "choose another --out")


def test_an_interrupted_build_of_the_same_split_resumes(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        build_cache(CountingVQ(fail_after=3), Images(), out, FP, batch_size=2, shard_size=4, progress=False,
                    split="test", dataset_config=TEST)
    second = CountingVQ()
    build_cache(second, Images(), out, FP, batch_size=2, shard_size=4, progress=False, split="test",
                dataset_config=TEST)
    assert second.calls == 3  # shard 0 was kept; shard 1 (2 batches) and shard 2 (1 batch) remain
    cache = LatentCache(str(out))
    assert len(cache) == 10 and cache.indices.tolist() == list(range(10))
    assert {k: cache.meta[k] for k in ("format", "split", "dataset", "dataset_size", "count")} == {
        "format": 2, "split": "test", "dataset": TEST, "dataset_size": 10, "count": 10}
    before, third = snapshot(out), CountingVQ()
    build_cache(third, Images(), out, FP, batch_size=2, shard_size=4, progress=False, split="test",
                dataset_config=TEST)
    assert third.calls == 0 and snapshot(out) == before  # complete: nothing to do


def test_an_older_cache_is_judged_on_what_it_records(tmp_path):
    """A meta.json written before the split and data config were recorded: read as before; a build into
    it is refused only on a recorded difference (here its first stage and its size)."""
    out = tmp_path / "x"
    build_cache(CountingVQ(), Images(), out, FP, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    old = {k: meta[k] for k in ("fingerprint", "shard_size", "latent_kind", "keys", "complete")}
    (out / "meta.json").write_text(json.dumps({**old, "count": 10}))
    assert len(LatentCache(str(out), expect=FP)) == 10
    model = CountingVQ()
    build_cache(model, Images(), out, FP, progress=False, split="test", dataset_config=TEST)
    assert model.calls == 0  # complete and not contradicted: kept as it is
    assert "ckpt_sha256='abc'" in refusal(lambda m: build_cache(m, Images(), out, {**FP, "ckpt_sha256": "def"},
                                                                progress=False, split="test"), out)
    assert "a data set of 10 items" in refusal(lambda m: build_cache(m, Images(12), out, FP, progress=False), out)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_left_out_and_recorded(tmp_path, workers):
    make_folder(tmp_path / "imgs")
    config = {"target": "ldm.data.image_folder.ImageFolder",
              "params": {"root": str(tmp_path / "imgs"), "size": 4, "max_pixels": 200 * 200}}
    ds = ImageFolder(**config["params"])
    names = [Path(p).name for p in ds.paths]
    bad = sorted(names.index(n) for n in BAD)
    good = [i for i in range(len(ds)) if i not in bad]
    # shards of 2: the last one ([truncated.jpg]) holds no good image at all
    build_cache(CountingVQ(), ds, tmp_path / "c", FP, batch_size=2, shard_size=2, progress=False, split="train",
                dataset_config=config, num_workers=workers)
    cache = LatentCache(str(tmp_path / "c"))
    assert cache.indices.tolist() == good
    fresh = ImageFolder(**config["params"])
    direct = CountingVQ().encode_to_latent(torch.stack([fresh[i]["image"] for i in good]))
    assert torch.equal(torch.stack([cache[i]["tokens"] for i in range(len(cache))]), direct)  # each its own image
    skipped = cache.meta["skipped"]
    assert cache.meta["count"] == len(good) == 7 and cache.meta["dataset_size"] == 11
    assert skipped["count"] == 4 and skipped["reasons"] == REASONS
    assert [(s["index"], Path(s["detail"].split(":")[0]).name) for s in skipped["first"]] == [
        (i, names[i]) for i in bad]
    assert summary(cache.meta).splitlines()[0] == "7 items, 4 skipped (too_large: 1, truncated: 1, unreadable: 2)"
    assert ds.skip_report() == REASONS  # what the workers found reaches the parent


def test_skipped_items_survive_an_interrupted_build(tmp_path):
    make_folder(tmp_path / "imgs")
    params = {"root": str(tmp_path / "imgs"), "size": 4, "max_pixels": 200 * 200}
    with pytest.raises(KeyboardInterrupt):  # shards 0 and 1 (empty.jpg, huge.png skipped) are written
        build_cache(CountingVQ(fail_after=2), ImageFolder(**params), tmp_path / "c", FP, batch_size=2, shard_size=2,
                    progress=False, split="train")
    resumed = ImageFolder(**params)  # a new process: it never opens the first shards' files
    build_cache(CountingVQ(), resumed, tmp_path / "c", FP, batch_size=2, shard_size=2, progress=False, split="train")
    assert resumed.skip_report() == {"truncated": 1, "unreadable": 1}
    meta = LatentCache(str(tmp_path / "c")).meta
    assert meta["count"] == 7 and meta["skipped"]["count"] == 4 and meta["skipped"]["reasons"] == REASONS


DD3 = {"double_z": False, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
       "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def cache_latents(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("_script_cache_latents",
                                                  Path(__file__).resolve().parents[2] / "scripts" / "cache_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run(lambda: module.main(argv))


def test_the_script_refuses_another_split_and_reports_skipped_images(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    make_folder(tmp_path / "test")
    (tmp_path / "val").mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / "val" / f"{i}.png")
    data = {split: {"target": "ldm.data.image_folder.ImageFolder",
                    "params": {"root": str(tmp_path / folder), "size": 16, "max_pixels": 200 * 200}}
            for split, folder in (("validation", "val"), ("test", "test"))}
    torch.manual_seed(0)
    params = {"ddconfig": DD3, "lossconfig": IDENTITY, "n_embed": 16, "embed_dim": 3}
    ckpt = tmp_path / "vq.ckpt"
    torch.save({"state_dict": VQModel(**params).state_dict(),
                "config": {"model": {"target": "ldm.first_stage.models.VQModel", "params": params},
                           "data": {"params": data}}}, ckpt)
    out = tmp_path / "cache" / "x"
    assert cache_latents(["-r", str(ckpt), "--split", "validation", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"cache ready: {out}: 3 items, 0 skipped\n"
    before = snapshot(out)
    assert cache_latents(["-r", str(ckpt), "--split", "test", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {out} holds the validation split; refusing to build the test split "
                                       "into it: choose another --out\n")
    assert snapshot(out) == before
    assert cache_latents(["-r", str(ckpt), "--split", "test", "--out", str(tmp_path / "cache" / "t")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cache ready: {tmp_path / 'cache' / 't'}: 7 items, 4 skipped (too_large: 1, truncated: 1, " \
                       "unreadable: 2)"
    assert [line.split(":")[0] for line in lines[1:]] == ["  index 1 (unreadable)", "  index 3 (too_large)",
                                                         "  index 9 (unreadable)", "  index 10 (truncated)"]
