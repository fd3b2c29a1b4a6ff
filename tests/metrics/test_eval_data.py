"""Evaluations find the image split behind a checkpoint's config: an image data set directly, the images
a latent cache was encoded from, or the first stage checkpoint's own data config."""

from __future__ import annotations

import pytest
import torch

from ldm.data.cache import build_cache, first_stage_fingerprint
from ldm.metrics.eval_data import image_split
from tests.data.test_cache import FMNISTLike, tiny_vq

IMAGES = {"target": "tests.data.test_cache.FMNISTLike", "params": {"n": 5}}


def prior_config(test_split, first_stage_ckpt=None):
    fs = {"target": "ldm.first_stage.models.VQModel", "params": {"ckpt_path": first_stage_ckpt}}
    return {"model": {"params": {"first_stage_config": fs}}, "data": {"params": {"test": test_split}}}


def test_an_image_split_is_used_directly():
    dataset, source = image_split({"data": {"params": {"test": IMAGES}}})
    assert isinstance(dataset, FMNISTLike) and len(dataset) == 5 and source == "data.params.test"
    with pytest.raises(ValueError, match=r"no data.params.validation; choose a split it has \(test\)"):
        image_split({"data": {"params": {"test": IMAGES}}}, "validation")


def test_a_latent_cache_leads_to_its_images(tmp_path):
    model = tiny_vq()
    build_cache(model, FMNISTLike(3), tmp_path / "cache", first_stage_fingerprint(model), progress=False,
                extra_meta={"dataset": IMAGES})
    cache_cfg = {"target": "ldm.data.cache.LatentCache", "params": {"root": str(tmp_path / "cache")}}
    dataset, source = image_split(prior_config(cache_cfg))
    assert len(dataset) == 5 and "latent cache" in source


def test_without_the_cache_the_first_stage_checkpoint_says(tmp_path):
    ckpt = tmp_path / "vq.ckpt"
    torch.save({"state_dict": {}, "config": {"model": {}, "data": {"params": {"test": IMAGES}}}}, ckpt)
    missing = {"target": "ldm.data.cache.LatentCache", "params": {"root": str(tmp_path / "gone")}}
    dataset, source = image_split(prior_config(missing, str(ckpt)))
    assert len(dataset) == 5 and str(ckpt) in source
    with pytest.raises(ValueError, match=r"latent cache .*gone.* without a record of its images; the first stage "
                                         r"checkpoint .*nope.ckpt"):
        image_split(prior_config(missing, str(tmp_path / "nope.ckpt")))


def test_captions_made_from_labels_lead_to_the_images_and_give_each_class_its_prompt(tmp_path):
    from ldm.metrics.eval_data import class_prompts

    model = tiny_vq()
    build_cache(model, FMNISTLike(3), tmp_path / "cache", first_stage_fingerprint(model), progress=False,
                extra_meta={"dataset": IMAGES})
    cache_cfg = {"target": "ldm.data.cache.LatentCache", "params": {"root": str(tmp_path / "cache")}}
    captions = {"target": "ldm.data.captions.ClassCaptions", "params": {"dataset": cache_cfg,
                                                                         "template": "a picture of a {}"}}
    dataset, source = image_split(prior_config(captions))
    assert len(dataset) == 5 and "latent cache" in source
    prompts = class_prompts(prior_config(captions))
    assert len(prompts) == 10 and prompts[5] == "a picture of a sandal"
    assert class_prompts(prior_config(cache_cfg)) is None


def test_generate_gives_a_text_prior_each_class_caption_in_turn():
    from ldm.metrics.prior_eval import generate

    class Recorder:
        device = torch.device("cpu")
        given = []

        def sample(self, n, cond=None, generator=None, **kw):
            self.given.append(cond)
            return torch.zeros(n, 1, 4, 4)

    prior = Recorder()
    images, labels = generate(prior, 5, 2, batch_size=3, progress=False, class_conds=["a shoe", "a bag"])
    assert prior.given == [["a shoe", "a bag", "a shoe"], ["a bag", "a shoe"]]
    assert labels.tolist() == [0, 1, 0, 1, 0] and images.shape == (5, 1, 4, 4)
