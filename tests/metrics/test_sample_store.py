"""Stored evaluation batches: an interrupted run resumes to the same samples; the shares of several processes
cover the plan once; the cost of a batch is measured (network rows, seconds, memory)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.metrics import sample_store
from ldm.metrics.classifier import FMNISTClassifier
from ldm.metrics.features import ClassifierFeatures
from ldm.metrics.sample_store import (
    BatchStore,
    batch_plan,
    collect,
    cost_scores,
    count_network_rows,
    draw_record,
    ensure_batches,
    run_key,
)
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "test"


@pytest.fixture(scope="module")
def prior():
    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / "absorbing.yaml"), resolve=True)
    torch.manual_seed(0)
    return instantiate_from_config(config["model"], key="model").eval()


def test_plan_and_shares_cover_every_batch_once(monkeypatch):
    plan = batch_plan(10, 4)
    assert plan == [(0, 4), (4, 4), (8, 2)]
    shares = []
    for r in range(2):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "2")
        shares.append(sample_store.my_batches(plan))
    assert shares == [[(0, 4), (8, 2)], [(4, 4)]]


def test_network_rows_are_counted_per_sample(prior):
    with count_network_rows(prior) as rows:
        prior.sample(3, cond=[0, 1, 2], generator=torch.Generator().manual_seed(0), steps=2, order="raster")
    assert rows[0] == 3 * 2  # raster order reveals one token a step: every row changes, every row is evaluated
    with count_network_rows(prior) as guided:
        prior.sample(3, cond=[0, 1, 2], generator=torch.Generator().manual_seed(0), steps=2, order="raster",
                     guidance_scale=2.0)
    assert guided[0] == 2 * rows[0]  # conditional and unconditional rows
    assert not prior.network("model", ema=True)._forward_hooks  # removed after the block


@pytest.mark.parametrize("use_cache", [1, 0])
def test_an_autoregressive_prior_is_charged_one_evaluation_per_decoded_token(use_cache):
    """ImageBART steps its decoders through `next_logits` (or reruns them on the prefix), never `forward`: a
    sample of T scales over N tokens costs T * N evaluations, twice that under guidance."""
    config = OmegaConf.to_container(OmegaConf.load(CONFIGS / "imagebart.yaml"), resolve=True)
    torch.manual_seed(0)
    bart = instantiate_from_config(config["model"], key="model").eval()
    tokens = bart.process.n_scales * math.prod(bart.latent_shape[-2:])
    for guidance in (1.0, 2.0):
        with count_network_rows(bart) as rows:
            bart.sample(3, cond=[0, 1, 2], generator=torch.Generator().manual_seed(0), use_cache=use_cache,
                        guidance_scale=guidance)
        assert rows[0] == 3 * tokens * (2 if guidance != 1.0 else 1)


def test_an_interrupted_run_resumes_to_the_samples_of_an_uninterrupted_one(prior, tmp_path, monkeypatch):
    ckpt = tmp_path / "prior.ckpt"
    ckpt.write_bytes(b"x")
    extractor = ClassifierFeatures(FMNISTClassifier().eval())
    plan = batch_plan(7, 3)

    def draw(start, size):
        return draw_record(prior, start, size, 10, 0, None, steps=2)

    whole = BatchStore(tmp_path / "a", run_key(ckpt, setting={"steps": 2}, seed=0))
    assert ensure_batches(whole, plan, draw, [extractor]) == 3
    resumed = BatchStore(tmp_path / "b", run_key(ckpt, setting={"steps": 2}, seed=0))
    ensure_batches(resumed, plan[:2], draw, [extractor])  # interrupted after two batches
    calls = []
    assert ensure_batches(resumed, plan, lambda s, b: calls.append(s) or draw(s, b), [extractor]) == 1
    assert calls == [6]  # only the missing batch
    a, b = collect(whole, plan, [extractor]), collect(resumed, plan, [extractor])
    assert a["images"].dtype == torch.uint8 and a["images"].shape[0] == 7
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["features"][extractor.name]["features"], b["features"][extractor.name]["features"])
    assert a["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    cost = cost_scores(a)
    assert cost["network_evaluations_per_sample"] > 0 and cost["seconds_per_sample"] > 0
    assert cost["peak_memory_mb"] > 0 and cost["peak_memory_mb_per_sample"] is None  # CPU: the process's peak
    # another setting, seed or a rewritten checkpoint is another folder; a missing batch is named
    assert BatchStore(tmp_path / "a", run_key(ckpt, setting={"steps": 3}, seed=0)).folder != whole.folder
    assert BatchStore(tmp_path / "a", run_key(ckpt, setting={"steps": 2}, seed=1)).folder != whole.folder
    with pytest.raises(FileNotFoundError, match="1 of 3 batches are missing"):
        collect(BatchStore(tmp_path / "b", run_key(ckpt, setting={"steps": 2}, seed=0)), [*plan[:2], (6, 2)])


def test_features_of_a_new_extractor_are_added_to_stored_batches(prior, tmp_path):
    ckpt = tmp_path / "p.ckpt"
    ckpt.write_bytes(b"x")
    store = BatchStore(tmp_path, run_key(ckpt))
    plan = batch_plan(2, 2)
    ensure_batches(store, plan, lambda s, b: draw_record(prior, s, b, None, 0, None, steps=1))
    torch.manual_seed(1)
    extractor = ClassifierFeatures(FMNISTClassifier().eval())
    out = collect(store, plan, [extractor])
    assert out["labels"] is None and out["features"][extractor.name]["features"].shape == (2, 128)
    assert extractor.name in store.load(0, 2)["features"]  # kept for the next scoring
