"""ImageBART's forward process: the original's schedules (`../shared/fixtures/imagebart/noise_schedules`),
the posterior in closed form, the bound, and the errors a bad schedule gets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagebart.process import MultinomialDiffusion, schedule_betas

DATA = Path(__file__).resolve().parents[2] / "data" / "imagebart"
# the fixture's schedule names, as this project's typed options
SCHEDULES = {
    "geometric_T4": dict(n_scales=4, kind="geometric"),
    "ffhq_custom_T2": dict(n_scales=2, kind="metric", table=DATA / "ffhq_schedule_vs_metric.json"),
    "imagenet_custom_T3": dict(n_scales=3, kind="metric", table=DATA / "in_schedule_vs_metric.json"),
    "imagenet_custom_T5": dict(n_scales=5, kind="metric", table=DATA / "in_schedule_vs_metric.json"),
    "extra_constant_T3": dict(n_scales=3, kind="constant", beta=0.1),
    "extra_alphacum_T2": dict(n_scales=2, kind="alphacum", alphacum=[1.0, 0.6, 0.2]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_match_the_original(name):
    from tests.fixture_paths import fixture_dir

    stored = load_file(str(fixture_dir("imagebart", "noise_schedules") / "schedules.safetensors"))
    betas = schedule_betas(**SCHEDULES[name])
    process = MultinomialDiffusion(16, betas)
    torch.testing.assert_close(betas, stored[f"{name}/temperature_range"], rtol=0, atol=0)
    torch.testing.assert_close(process.alphas, stored[f"{name}/alphats"], rtol=0, atol=0)
    torch.testing.assert_close(process.alphacum, stored[f"{name}/alphacum"], rtol=0, atol=0)


def test_metric_tables_are_the_fixtures():
    from tests.fixture_paths import fixture_dir

    root = fixture_dir("imagebart", "schedule_vs_metric")
    for name in ("ffhq_schedule_vs_metric.json", "in_schedule_vs_metric.json"):
        assert json.loads((DATA / name).read_text()) == json.loads((root / name).read_text()) or name == ""


def test_posterior_is_bayes_rule_on_the_chain():
    """q(x_{t-1} | x_t, x_0) from the closed form equals the joint of the two forward steps, normalised,
    computed by enumeration over K for one position."""
    K = 5
    process = MultinomialDiffusion(K, schedule_betas(3, "constant", beta=0.3))
    x0, xt, t = torch.tensor([[2]]), torch.tensor([[4]]), torch.tensor([2])
    A_prev, a_t = float(process.alphacum[1]), float(process.alphas[2])
    joint = torch.tensor([(A_prev * (k == 2) + (1 - A_prev) / K) * (a_t * (k == 4) + (1 - a_t) / K) for k in range(K)])
    torch.testing.assert_close(process.posterior(x0, xt, t)[0, 0], joint / joint.sum())


def test_forward_draws_have_the_marginal_rates():
    """x_t keeps x_0 with probability A_t + (1 - A_t) / K; the pair's x_t is one more step from x_{t-1}."""
    K = 4
    process = MultinomialDiffusion(K, schedule_betas(4, "geometric"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(20000, 8, dtype=torch.long)
    for step in (1, 2, 3):
        t = torch.full((20000,), step)
        prev, xt = process.q_pair(x0, t, g)
        A = float(process.alphacum[step])
        assert abs((xt == 0).float().mean().item() - (A + (1 - A) / K)) < 0.01
        a = float(process.alphas[step])
        assert abs((xt == prev).float().mean().item() - (a + (1 - a) / K)) < 0.01


def test_nll_bound_of_the_true_reverse_process_is_the_entropy_gap():
    """A transition that outputs the exact posterior q(x_{t-1} | x_t, x_0) makes every KL zero; what is left is
    KL(q(x_T | x_0) || uniform), 0 for a schedule ending in pure noise and log K per token for one that adds none."""
    K, n = 6, 5
    x0 = torch.randint(0, K, (3, n))
    noisy = MultinomialDiffusion(K, schedule_betas(2, "geometric"))
    oracle = lambda prev, xt, t: noisy.posterior(x0, xt, t).log()  # noqa: E731
    torch.testing.assert_close(noisy.nll_terms(oracle, x0), torch.zeros(3), atol=1e-5, rtol=0)
    quiet = MultinomialDiffusion(K, torch.tensor([0.0, 1e-12]))
    torch.testing.assert_close(quiet.prior_kl(x0), torch.full((3,), n * math.log(K)), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_scales=2, kind="alphacum", alphacum=[1.0, 0.3, 0.5]), "schedule is not monotone: A_2 = 0.5 after A_1 = 0.3"),
    (dict(n_scales=2, kind="alphacum", alphacum=[1.0, 0.5]), "needs n_scales + 1 = 3 values"),
    (dict(n_scales=2, kind="alphacum", alphacum=[0.9, 0.5, 0.0]), "must start at A_0 = 1"),
    (dict(n_scales=2, kind="constant", beta=1.5), "needs beta in (0, 1]"),
    (dict(n_scales=2, kind="cosine"), "schedule kind must be one of geometric, constant, alphacum, metric"),
    (dict(n_scales=2, kind="metric", table=DATA / "ffhq_schedule_vs_metric.json", metric="LPIPS"), "has no bernoulli/LPIPS"),
    (dict(n_scales=2, kind="metric", table="missing.json"), "schedule table missing.json does not exist"),
])
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        schedule_betas(**kwargs)
    assert message in str(e.value)


def test_schedule_metric_script_measures_a_table_the_schedules_read(tmp_path):
    """scripts/schedule_metric.py on a tiny VQ writes the original's table layout; at A = 1 the score is the first
    stage's own reconstruction's, and the table gives a monotone custom schedule through the same reader as the
    paper's tables."""
    from ldm.cli import run
    from tests.test_script_checks import save_checkpoint
    from tests.test_scripts import load

    ckpt = save_checkpoint("first_stage_vq.yaml", tmp_path / "vq.ckpt")
    out = tmp_path / "table.json"
    argv = ["-r", ckpt, "--split", "validation", "--limit", "4", "--levels", "5", "--metrics", "PSNR,SSIM",
            "--out", str(out)]
    assert run(lambda: load("schedule_metric").main(argv)) == 0
    table = json.loads(out.read_text())["bernoulli"]
    assert table["alphacum"] == [1.0, 0.75, 0.5, 0.25, 0.0] and len(table["PSNR"]) == 5 == len(table["SSIM"])
    from ldm.checkpoint import instantiate_from_checkpoint
    from ldm.metrics.eval_data import image_split
    from ldm.metrics.image import psnr
    from ldm.metrics.prior_eval import dataset_images

    vq, config = instantiate_from_checkpoint(ckpt)
    images = dataset_images(image_split(config, "validation")[0], 4)
    with torch.no_grad():
        recon = vq.decode_indices(vq.encode_to_indices(images)).clamp(-1, 1)
    assert table["PSNR"][0][0] == pytest.approx(float(psnr(recon, images).mean()), rel=1e-5)
    betas = schedule_betas(3, "metric", table=out, metric="PSNR")
    process = MultinomialDiffusion(16, betas)
    assert process.alphacum[0] == 1 and all(process.alphacum[1:] <= process.alphacum[:-1])
