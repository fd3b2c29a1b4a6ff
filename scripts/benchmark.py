"""Sampling overhead of a prior: time per sampling step over one bare network forward on the inputs a
sampling step feeds it (the prior's `sampling_forward`; the doubled batch under guidance).

    python scripts/benchmark.py -r logs/<prior run>/checkpoints/last.ckpt --batch 64 --steps 32
    python scripts/benchmark.py --config configs/absorbing/fmnist.yaml    # random weights, same shapes

Both timings come from one run, interleaved, so the ratio holds on any machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import _without_ckpt_paths, instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, needs, run  # noqa: E402
from ldm.util import get_obj_from_str, instantiate_from_config  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-r", "--resume")
    g.add_argument("--config")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return p


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--batch", args.batch), ("--steps", args.steps), ("--repeats", args.repeats)):
        at_least(flag, value)
    at_least("--threads", args.threads, 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    is_prior = needs("prior", "benchmark.py")
    if args.resume:
        prior, _ = instantiate_from_checkpoint(args.resume, check_class=is_prior)
    else:
        cfg = OmegaConf.to_container(OmegaConf.load(args.config).model, resolve=True)
        is_prior(get_obj_from_str(cfg.get("target"), key="model.target"))
        prior = instantiate_from_config(_without_ckpt_paths(cfg), key="model").eval()
    if not hasattr(prior, "sampling_forward"):
        raise SystemExit(f"{type(prior).__name__} does not offer sampling_forward(), the network call one "
                         "sampling step makes; it cannot be benchmarked")
    for flag, option, value in (("--steps", "steps", args.steps), ("--guidance", "guidance_scale", args.guidance)):
        try:
            prior.check_sampler_options({option: value})
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    n, steps = args.batch, args.steps
    cond = (torch.arange(n) % prior.num_classes).to(prior.device) if prior.num_classes else None
    # both sides run the networks sampling uses (the EMA copies; nothing is swapped)
    forward = prior.sampling_forward(n, cond, guidance_scale=args.guidance)
    sampler_cond = prior.user_cond(cond, n)

    def sampling():
        generator = torch.Generator(device=prior.device).manual_seed(0)
        prior.sample_latents(n, sampler_cond, generator, steps=steps, guidance_scale=args.guidance)

    forward(), sampling()  # warm-up
    fwd, samp = [], []
    for _ in range(args.repeats):  # interleaved so drift affects both
        fwd.append(timed(forward, 3))
        samp.append(timed(sampling, 1) / steps)
    result = {"batch": n, "steps": steps, "guidance": args.guidance, "threads": torch.get_num_threads(),
              "forward_s": statistics.median(fwd), "step_s": statistics.median(samp)}
    result["step_over_forward"] = result["step_s"] / result["forward_s"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
