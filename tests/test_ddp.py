"""DDP on CPU (gloo, two processes): the same training as one process with the same global batch,
and a signal that reaches one rank stops and saves all of them.

The helpers (`run_main`, `start_main`, `final_state`, `child_pids`) are meant for any model's
DDP test: run `main.py` with N CPU devices, get back the run folder and the final weights.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
VQ = "configs/test/first_stage_vq.yaml"
# Small and quick: no validation, no images, no periodic checkpoints; the codebook's EMA with decay
# 0.5 lets unused codes die within a few steps, so dead-code restarts run.
VQ_QUICK = ["lightning.trainer.limit_val_batches=0", "lightning.callbacks.image_logger.params.disabled=true",
            "lightning.checkpoint_every_n_steps=1000", "model.params.decay=0.5"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def main_command(base: str | None, logroot: Path, devices: int, overrides: list[str], args: list[str]) -> list[str]:
    """`python main.py` training on `devices` CPU processes (DDP when more than one); `base` None with
    `args=["-r", run_dir]` resumes with the run's own config."""
    strategy = ["lightning.trainer.strategy=ddp"] if devices > 1 else []
    config = ["--base", base] if base else []
    return [sys.executable, "main.py", *config, "-t", "--no-test", "-l", str(logroot),
            "--accelerator", "cpu", "--devices", str(devices), *args, *strategy, *overrides]


def main_env() -> dict[str, str]:
    # one thread per process: two ranks share the CPUs fairly, and the kernels' reduction order does not
    # depend on how many threads the machine happens to offer
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_main(base: str | None, logroot: Path, devices: int = 1, overrides: list[str] = (), args: list[str] = (),
               log: Path | None = None) -> subprocess.Popen:
    """Start `main.py` (rank 0; Lightning launches the other ranks as its children)."""
    out = open(log or logroot.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(main_command(base, logroot, devices, list(overrides), list(args)), cwd=REPO,
                            env=main_env(), stdout=out, stderr=subprocess.STDOUT)


def only_run(logroot: Path) -> Path:
    runs = [p for p in logroot.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def run_main(base: str | None, logroot: Path, devices: int = 1, overrides: list[str] = (), args: list[str] = (),
             timeout: float = 300) -> Path:
    """Train to the end with `devices` CPU processes; the run folder."""
    log = logroot.with_suffix(".resume.log" if "-r" in args else ".log")
    proc = start_main(base, logroot, devices, overrides, args, log)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, f"main.py exited with {rc}:\n{log.read_text()[-4000:]}"
    return only_run(logroot) if not args or "-r" not in args else Path(args[list(args).index("-r") + 1])


def final_state(run_dir: Path) -> dict:
    """The checkpoint `last.ckpt` of a run folder (state_dict, global_step, ...)."""
    return read_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"))


def child_pids(pid: int) -> list[int]:
    """Direct children of a process: the ranks > 0 that Lightning's launcher started (Linux /proc)."""
    kids: list[int] = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        kids += [int(k) for k in Path(task).read_text().split()]
    return kids


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float]:
    assert a.keys() == b.keys()
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()}
    key = max(diffs, key=diffs.get)
    return key, diffs[key]


# --- the quantiser alone: two ranks with half a batch each == one process with all of it -------------------
def _quantizer_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from ldm.first_stage.quantize import VectorQuantizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        z = torch.randn(4, 4, 3, 3)  # (B, e_dim, h, w): the global batch
        torch.manual_seed(1)  # the same RNG state as the single process at its first draw
        q = VectorQuantizer(6, 4, ema_update=True, decay=0.5, init_from_data=True, restart_dead_codes=True,
                            dead_threshold=1.0).train()
        for _ in range(4):
            q(z.chunk(world)[rank])
        torch.save({"state": q.state_dict(), "usage": q.usage_stats()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_quantizer_ranks_equal_one_process(tmp_path):
    from ldm.first_stage.quantize import VectorQuantizer

    mp.spawn(_quantizer_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    z = torch.randn(4, 4, 3, 3)
    torch.manual_seed(1)
    q = VectorQuantizer(6, 4, ema_update=True, decay=0.5, init_from_data=True, restart_dead_codes=True,
                        dead_threshold=1.0).train()
    for _ in range(4):
        q(z)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["usage"] == q.usage_stats()  # usage counters are summed over ranks
        for k, v in q.state_dict().items():
            # EMA sums add per-rank partial sums: the same numbers in another order (float rounding)
            torch.testing.assert_close(r["state"][k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert float(q.code_usage.max()) > 1.0 and torch.equal(ranks[0]["state"]["code_usage"],
                                                            ranks[1]["state"]["code_usage"])


# --- main.py: 2 ranks x 4 images == 1 process x 8 images -------------------------------------------------
@pytest.mark.slow
def test_ddp_first_stage_matches_one_process(tmp_path):
    # disc_start beyond the run: the discriminator's BatchNorm batch statistics and the loss's adaptive
    # weight (gradient norms) are still computed per rank, so with the discriminator on, DDP trains
    # close to, not equal to, one process; everything the first stage itself learns from data is global
    steps = ["lightning.trainer.max_steps=4", "model.params.lossconfig.params.disc_start=1000"]
    one = run_main(VQ, tmp_path / "one", 1, [*VQ_QUICK, *steps, "data.params.batch_size=8"])
    two = run_main(VQ, tmp_path / "two", 2, [*VQ_QUICK, *steps, "data.params.batch_size=4"])
    a, b = final_state(one), final_state(two)
    assert a["global_step"] == b["global_step"] == 4
    report = compare_weights(a["state_dict"], b["state_dict"], lr=4e-4, steps=4)
    print("one process vs two ranks:", report)
    moved = max_difference(a["state_dict"], read_checkpoint_init(one))[1]
    assert moved > 1e-3  # the runs did train


@pytest.mark.slow
def test_ddp_prior_matches_one_process(tmp_path):
    """The tiny absorbing prior: the same data blocks, the same timesteps, masks and class dropout
    (drawn for the global batch, each rank keeping its block), the same importance-sampling history
    (gathered from the ranks), hence the same weights and EMA copy as one process."""
    prior = "configs/test/absorbing.yaml"
    quick = ["lightning.trainer.max_steps=4", "lightning.trainer.limit_val_batches=0",
             "lightning.callbacks.image_logger.params.disabled=true", "lightning.checkpoint_every_n_steps=1000"]
    one = run_main(prior, tmp_path / "one", 1, [*quick, "data.params.batch_size=8"])
    two = run_main(prior, tmp_path / "two", 2, [*quick, "data.params.batch_size=4"])
    a, b = final_state(one), final_state(two)
    assert a["global_step"] == b["global_step"] == 4
    history = a["state_dict"]["process.Lt_count"]
    assert int(history.sum()) == 4 * 8  # every row of every global batch counted once, on every rank
    assert torch.equal(history, b["state_dict"]["process.Lt_count"])
    report = compare_weights(a["state_dict"], b["state_dict"], lr=1e-3, steps=4)
    print("absorbing prior, one process vs two ranks:", report)
    assert max_difference(a["state_dict"], read_checkpoint_init(one))[1] > 1e-3  # it did train


def compare_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float, steps: int) -> dict:
    """Assert two runs' weights agree up to float rounding; the largest differences found.

    Not bit-equal: DDP averages the ranks' gradients and sums their codebook statistics, the same
    numbers added in another order (float32, ~1e-7 relative). Weights (2-D and up) must agree to a
    tenth of one step (lr / 10; measured: 5e-6 to 1.2e-5 at lr 4e-4, from the few entries whose
    gradient is near zero, where Adam's normalisation magnifies rounding), the codebook and its EMA sums
    to 1e-5 of their largest entry (the "codebook" value returned is relative to it). Vectors (biases, norm gains) may differ by up to Adam's bound, 2 lr per
    step: some get no gradient in exact arithmetic (a conv bias right before a GroupNorm with one
    channel per group, an attention key bias, which softmax ignores), so what they get is rounding
    noise, and Adam turns noise of either sign into a full step of lr. A real mismatch (data order,
    a per-rank statistic, another random pick) moves the weights by ~lr and the codebook by O(1).
    """
    assert a.keys() == b.keys()
    worst = {"weights": 0.0, "codebook": 0.0, "vectors": 0.0}
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        d = float((a[k].double() - b[k].double()).abs().max())
        if k.startswith("quantize."):
            # sums over the batch (EMA statistics, codes = their ratios): error grows with their size
            scale = float(a[k].abs().max())
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=k)
            worst["codebook"] = max(worst["codebook"], d / max(scale, 1.0))
        elif a[k].dim() >= 2:
            assert d < 0.1 * lr, (k, d)
            worst["weights"] = max(worst["weights"], d)
        else:
            assert d <= 2 * lr * steps, (k, d)
            worst["vectors"] = max(worst["vectors"], d)
    return worst


def read_checkpoint_init(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a run starts from: the model built from its saved config under the same seed."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(sorted(glob.glob(str(run_dir / "configs" / "*-project.yaml")))[-1])
    pl.seed_everything(23)
    return instantiate_from_config(config.model, key="model").state_dict()


# --- SIGUSR1 to one rank: all ranks save last.ckpt and stop; -r resumes to the end ----------------------
@pytest.mark.slow
def test_sigusr1_to_one_rank_saves_and_resumes(tmp_path):
    logroot = tmp_path / "logs"
    overrides = [*VQ_QUICK, "lightning.trainer.max_steps=100000", "data.params.batch_size=2",
                 "model.params.lossconfig.params.disc_start=3", "lightning.checkpoint_every_n_steps=2"]
    proc = start_main(VQ, logroot, 2, overrides, log=tmp_path / "first.log")
    try:
        ckpt = lambda: glob.glob(str(logroot / "*" / "checkpoints" / "last.ckpt"))  # noqa: E731
        t0 = time.time()
        while not (ckpt() and read_checkpoint(ckpt()[0])["global_step"] >= 2):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() - t0 < 240, "timed out"
            time.sleep(0.2)
        ranks = child_pids(proc.pid)
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGUSR1)  # rank 1 only
        assert proc.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "first.log").read_text()
    assert "Received signal 10" in text and "Stopping after the signal." in text
    run_dir = only_run(logroot)
    step = final_state(run_dir)["global_step"]
    assert 2 <= step < 100000
    run_main(None, logroot, 2, args=["-r", str(run_dir), "--max_steps", str(step + 2)])
    final = final_state(run_dir)
    assert final["global_step"] == step + 2
    assert only_run(logroot) == run_dir
