"""Sampling overhead of a prior: time per sampling step over the bare network evaluations of that step, on
the very inputs the sampler fed them (recorded while it samples and replayed; the doubled batch under guidance).

    python scripts/benchmark.py -r logs/<prior run>/checkpoints/last.ckpt --batch 64 --steps 32
    python scripts/benchmark.py --config configs/absorbing/fmnist.yaml    # random weights, same shapes
    python scripts/benchmark.py -r logs/<prior run>/checkpoints/last.ckpt --out outputs/bench/new.json \
        --compare outputs/bench/old.json    # JSON + markdown; ratios against an earlier run
    python scripts/benchmark.py --config configs/sundae/ffhq256.yaml --cost-lengths 256,1024 --batch 4
    python scripts/benchmark.py --config configs/sundae/ffhq1024.yaml --one-step --batch 1  # builds and runs
    python scripts/benchmark.py --config configs/imagebart/fmnist.yaml --compare-cache --batch 8 \
        model.params.latent_shape=[16,16]    # 256 tokens: cached against uncached decoding
    python scripts/benchmark.py -r logs/<prior run>/checkpoints/last.ckpt --training 20   # cache vs on the fly
    python scripts/benchmark.py --config configs/absorbing/fmnist.yaml --cost-table 64,256,1024,4096 --batch 4

Both timings come from one run, interleaved, so the ratio holds on any machine: every call a sampling step
makes to the prior's networks (`sampling_networks()`) is recorded with a copy of its inputs and, in the
sampler's callback right after the step, replayed on the bare network and timed; each step is paired with
its replay, so a step that ran the network on fewer rows (absorbing's unchanged rows, SUNDAE's stopped
samples) or on a cascade stage's network is paired like for like. A network the sampler drives through other
methods (ImageBART's cached decoder steps) is replayed by the sampler itself: its callback offers the step's
network evaluation to run again on the same inputs (`info["replay"]`); failing both, the prior's
`sampling_forward` times one pass of those calls on fixed tokens. The median of the per-step ratios and its
quartiles are reported, with the network rows evaluated per image and the peak memory. A step's time is what the sampler spent
between two callbacks.
`--cost-lengths` instead compares the prior's hourglass network with a plain transformer of the same width
and total depth at those sequence lengths (square token maps): forward + backward time, the activations
autograd keeps and, on CUDA, the peak memory, with their ratios (`sundae.cost`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import _without_ckpt_paths, instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, compile_prior, needs, output_path, run, sampler_kwargs  # noqa: E402
from ldm.throughput import CallRecorder, PeakMemory, classes_in_turn, drain, timed_call  # noqa: E402
from ldm.train import load_config  # noqa: E402
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
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps, for priors that take them (default: the prior's own default)")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a further sampler option (repeatable), e.g. --option min_steps=null to time SUNDAE's "
                        "steps on the whole batch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prior's networks first (sampling benchmark; reports compile_s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--cost-lengths", default=None,
                   help="comma-separated sequence lengths: compare the hourglass network with a plain transformer")
    p.add_argument("--cost-table", default=None, metavar="LENGTHS",
                   help="comma-separated token counts (square maps), e.g. 64,256,1024,4096: forward + backward time "
                        "and activation memory of the prior's training loss, rebuilt with random weights at each")
    p.add_argument("--versus", action="append", default=[], metavar="KEY=VALUE",
                   help="with --cost-table: also time the prior built with this model.params override (e.g. "
                        "channels_last=true, fused_optimizer=false), interleaved, and report the ratios")
    p.add_argument("--device", default=None, help="device for --cost-lengths and --cost-table (default: the prior's)")
    p.add_argument("--compare-cache", action="store_true",
                   help="time sampling with the key/value cache against without it (priors with a use_cache "
                        "option), and check both give the same samples")
    p.add_argument("--one-step", action="store_true",
                   help="build the prior (random weights with --config) and run one training step and one "
                        "sampling step at --batch on random latents of its shape: time and peak memory")
    p.add_argument("--training", type=int, default=None, metavar="STEPS",
                   help="time STEPS training steps fed from the prior's latent cache against as many fed the images "
                        "the cache was built from (encoded on the fly), interleaved: images/s and tokens/s of each")
    p.add_argument("--out", default=None, help="write the result as JSON (and a markdown table beside it, .md)")
    p.add_argument("--compare", default=None, metavar="OLD.json",
                   help="an earlier --out of this script: print this run's figures over its")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of --config, e.g. "
                                                "model.params.latent_shape=[16,16]")
    return p


def parse_lengths(text: str, flag: str = "--cost-lengths") -> list[int]:
    try:
        lengths = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    for n in lengths:
        at_least(flag, n)
    return lengths


def hourglass_cost(prior, args: argparse.Namespace) -> int:
    """The --cost-lengths table: hourglass against a plain transformer of the same width and total depth."""
    from sundae.cost import check_lengths, compare_with_plain
    from sundae.hourglass import HourglassTransformer

    nets = [prior.network(name) for name in prior.network_names]
    net = next((n for n in nets if isinstance(n, HourglassTransformer)), None)
    if net is None:
        raise ValueError(f"--cost-lengths needs a prior with an hourglass network; {type(prior).__name__}'s is "
                         f"{', '.join(type(n).__name__ for n in nets)}")
    lengths = parse_lengths(args.cost_lengths)
    check_lengths(net.hparams, lengths)  # every length, before the first timing
    rows = compare_with_plain(net, lengths, batch=args.batch, repeats=args.repeats,
                              device=args.device or prior.device)
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return 0


def cost_table(prior, config: dict, args: argparse.Namespace) -> int:
    """--cost-table: the prior's whole training loss (every network it trains) at each token count, rebuilt
    with random weights at that latent size: forward + backward seconds, activations, CUDA peak."""
    from ldm.throughput import training_cost
    from sundae.cost import square_grid

    lengths = parse_lengths(args.cost_table, "--cost-table")
    grids = [square_grid(n, "--cost-table") for n in lengths]  # every length, before the first timing
    device = torch.device(args.device or prior.device)
    rows = []
    for n, grid in zip(lengths, grids):
        model_cfg = copy.deepcopy(config["model"])
        model_cfg.setdefault("params", {})["latent_shape"] = [*prior.latent_shape[:-2], *grid]
        torch.manual_seed(0)
        try:
            sized = instantiate_from_config(_without_ckpt_paths(model_cfg), key="model")
        except ValueError as e:
            raise ValueError(f"--cost-table {n}: {type(prior).__name__} cannot be built at {grid[0]}x{grid[1]} "
                             f"tokens: {e}") from None
        versus = None
        if args.versus:
            versus_cfg = OmegaConf.merge(OmegaConf.create(model_cfg), OmegaConf.from_dotlist(
                [f"params.{kv.removeprefix('model.params.')}" for kv in args.versus]))
            torch.manual_seed(0)
            versus = instantiate_from_config(OmegaConf.to_container(versus_cfg), key="model").to(device)
        rows.append(training_cost(sized.to(device), args.batch, args.repeats, versus))
        print(json.dumps(rows[-1]))
        del sized, versus
    result = {"prior": type(prior).__name__, "rows": rows, "environment": environment(prior)}
    result["environment"]["device"] = str(device)
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        head = ["| tokens | latent shape | batch | parameters | forward + backward (s) | optimizer step (s) | "
                "activations (MiB) |" + (" CUDA peak (MiB) |" if device.type == "cuda" else ""),
                "|---" * (8 if device.type == "cuda" else 7) + "|"]
        body = [f"| {r['tokens']} | {'x'.join(map(str, r['latent_shape']))} | {r['batch']} | {r['parameters']:,} | "
                f"{r['forward_backward_s']:.4g} | {r['optimizer_step_s']:.4g} | {r['activation_bytes'] / 2**20:.1f} |"
                + (f" {r['cuda_peak_bytes'] / 2**20:.1f} |" if "cuda_peak_bytes" in r else "") for r in rows]
        if args.versus:
            body += ["", f"With {' '.join(args.versus)}, timed interleaved with the rows above (time over theirs):", "",
                     "| tokens | forward + backward | optimizer step |", "|---|---|---|"]
            body += [f"| {r['tokens']} | {r['versus']['forward_backward_ratio']:.3f} | "
                     f"{r['versus']['optimizer_step_ratio']:.3f} |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(head + body) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def one_step(prior, args: argparse.Namespace) -> int:
    """One optimizer step on random latents of the prior's shape, then one sampling step, at --batch: that a
    configuration builds and runs at all on this machine, with its times and the process's peak memory."""
    import resource

    from ldm.throughput import random_latents

    n = args.batch
    g = torch.Generator(device=prior.device).manual_seed(0)
    latents = random_latents(prior, n, g)
    cond = classes_in_turn(prior, n)
    prior.train()
    optimizer = prior.build_optimizer()
    t0 = time.perf_counter()
    loss, _ = prior.compute_loss(latents, cond, generator=g)
    loss.backward()
    optimizer.step()
    train_s = time.perf_counter() - t0
    prior.eval()
    names = prior.sampler_options.names()
    options = {"steps": 1} if "steps" in names else {}
    if "min_steps" in names:
        options["min_steps"] = None
    t0 = time.perf_counter()
    with torch.no_grad():
        sample = prior.sample_latents(n, cond, g, **options)
    sample_s = time.perf_counter() - t0
    result = {"prior": type(prior).__name__, "parameters": sum(p.numel() for p in prior.trained_parameters()),
              "batch": n, "latent_shape": list(prior.latent_shape), "loss": float(loss), "train_step_s": train_s,
              "sampling_step_s": sample_s, "sample_shape": list(sample.shape), "threads": torch.get_num_threads(),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(json.dumps(result, indent=2))
    return 0


def cache_comparison(prior, args: argparse.Namespace, options: dict) -> int:
    """Sampling with the key/value cache against without it, interleaved, on the same seed: the speed-up and
    whether the samples are the same."""
    n = args.batch
    cond = classes_in_turn(prior, n)

    def sampling(use_cache: int) -> torch.Tensor:
        generator = torch.Generator(device=prior.device).manual_seed(0)
        return prior.sample_latents(n, cond, generator, use_cache=use_cache, **options)

    same = torch.equal(sampling(1), sampling(0))  # also the warm-up
    cached, uncached = [], []
    for _ in range(args.repeats):
        cached.append(timed(lambda: sampling(1), 1))
        uncached.append(timed(lambda: sampling(0), 1))
    result = {"batch": n, "tokens": int(torch.tensor(prior.latent_shape[-2:]).prod()), "guidance": args.guidance,
              "threads": torch.get_num_threads(), "cached_s": statistics.median(cached),
              "uncached_s": statistics.median(uncached), "same_samples": same}
    result["speedup"] = result["uncached_s"] / result["cached_s"]
    print(json.dumps(result, indent=2))
    return 0


def training_comparison(prior, config: dict, args: argparse.Namespace) -> int:
    """--training: steps fed from the latent cache against steps that encode the cache's images on the fly."""
    from ldm.metrics.eval_data import image_split
    from ldm.throughput import training_throughput

    train = ((config.get("data") or {}).get("params") or {}).get("train")
    if not train or not hasattr(get_obj_from_str(train.get("target"), key="data.params.train.target"),
                                "image_dataset_config"):
        raise ValueError("--training compares training from a latent cache with encoding images on the fly; this "
                         f"prior's data.params.train is {(train or {}).get('target', 'missing')}, not a latent cache")
    cache = instantiate_from_config(train, key="data.params.train")
    images, source = image_split(config, "train")
    result = training_throughput(prior, {"cache": cache, "pixels": images}, args.batch, args.training)
    result["pixels_from"] = source
    for name in ("cache", "pixels"):
        for key, value in result[name].items():
            result[f"{name}_{key}"] = value
    result["cache_over_pixels"] = result["cache_images_per_s"] / result["pixels_images_per_s"]
    result["environment"] = environment(prior)
    report(result, args, TRAINING_FIGURES)
    return 0


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out:
        output_path(args.out, (".json",))
    if args.compare:
        try:
            json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--compare: cannot read {args.compare} as an earlier benchmark result ({e})") from None
    for flag, value in (("--batch", args.batch), ("--repeats", args.repeats)):
        at_least(flag, value)
    for flag, value in (("--steps", args.steps), ("--training", args.training)):
        if value is not None:
            at_least(flag, value)
    at_least("--threads", args.threads, 0)
    other = [flag for flag, on in (("--training", args.training is not None), ("--cost-table", args.cost_table),
                                   ("--cost-lengths", args.cost_lengths), ("--one-step", args.one_step),
                                   ("--compare-cache", args.compare_cache)) if on]
    if args.compile and other:
        raise ValueError(f"--compile applies to the sampling benchmark, not to {other[0]}")
    if args.versus and args.cost_table is None:
        raise ValueError("--versus times a second build of the prior beside the first in --cost-table; give "
                         "--cost-table too")
    if args.threads:
        torch.set_num_threads(args.threads)
    is_prior = needs("prior", "benchmark.py")
    if args.resume:
        prior, config = instantiate_from_checkpoint(args.resume, check_class=is_prior)
    else:
        config = OmegaConf.to_container(load_config([args.config], args.overrides), resolve=True)
        is_prior(get_obj_from_str(config["model"].get("target"), key="model.target"))
        prior = instantiate_from_config(_without_ckpt_paths(config["model"]), key="model").eval()
    if args.training is not None:
        with torch.enable_grad():
            return training_comparison(prior, config, args)
    if args.cost_lengths is not None:
        with torch.enable_grad():
            return hourglass_cost(prior, args)
    if args.cost_table is not None:
        with torch.enable_grad():
            return cost_table(prior, config, args)
    if args.one_step:
        with torch.enable_grad():
            return one_step(prior, args)
    if not hasattr(prior, "sampling_forward"):
        raise SystemExit(f"{type(prior).__name__} does not offer sampling_forward(), the network call one "
                         "sampling step makes; it cannot be benchmarked")
    if args.compile:
        compile_prior(prior)
    try:
        options: dict = prior.check_sampler_options(sampler_kwargs(args.option)) if args.option else {}
    except ValueError as e:
        raise ValueError(f"--option: {e}") from None
    for flag, option, value in (("--steps", "steps", args.steps), ("--guidance", "guidance_scale", args.guidance)):
        if value is None or (option == "guidance_scale" and value == 1.0):
            continue
        try:
            options.update(prior.check_sampler_options({option: value}))
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    if args.compare_cache:
        if "use_cache" not in prior.sampler_options.names():
            raise ValueError(f"--compare-cache: {type(prior).__name__} has no use_cache option")
        return cache_comparison(prior, args, options)
    n = args.batch
    cond = (torch.arange(n) % prior.num_classes).to(prior.device) if prior.num_classes else None
    # both sides run the networks sampling uses (the EMA copies; nothing is swapped)
    forward_options = {"guidance_scale": args.guidance, **options}  # a cascade's per-stage settings among them
    forward = prior.sampling_forward(n, cond, **forward_options)
    sampler_cond = prior.user_cond(cond, n)

    per_call = getattr(forward, "steps_per_call", 1)  # a forward that stands for several sampling steps
    paired = per_call == 1  # a bare forward between every two sampling steps: pairs a few tenths of a second apart
    forwards = {(n, None): forward}  # by batch size and cascade stage: a step is paired with its own network's
    # forward, on as many rows as it ran

    def forward_on(rows: int, stage: int | None):
        if (rows, stage) not in forwards:
            where = {} if stage is None else {"stage": stage}
            forwards[rows, stage] = prior.sampling_forward(rows, None if cond is None else cond[:rows],
                                                           **forward_options, **where)
        return forwards[rows, stage]

    clock = [0.0]
    paired_forward_s: list[float] = []  # the bare networks' time on each sampling step's own calls (0: none ran)
    step_times: list[float] = []
    rows_run = [0]  # network rows the last sampling run evaluated, over all its steps
    replayed_by_prior = [False]
    recorder = CallRecorder(prior.sampling_networks())

    def after_step(info) -> None:
        drain(prior.device)
        step_times.append(time.perf_counter() - clock[0])
        calls = recorder.take()
        if calls:  # replay the very calls this step made, on the bare networks
            rows_run[0] += recorder.rows(calls)
            paired_forward_s.append(recorder.replay(calls))
        elif "replay" in info:  # the prior reruns the step's own network evaluation (a cached decoder step)
            paired_forward_s.append(timed_call(info["replay"], prior.device))
            replayed_by_prior[0] = True
        else:  # a network the sampler drives through other methods (a key/value cache): its own yardstick
            rows = int(info.get("evaluated", n))  # samplers that skip rows say how many the network ran on
            paired_forward_s.append(timed(forward_on(rows, info.get("stage")), 1) if paired and rows else 0.0)
        clock[0] = time.perf_counter()

    def sampling():
        generator = torch.Generator(device=prior.device).manual_seed(0)
        paired_forward_s.clear(), step_times.clear(), recorder.take()
        rows_run[0] = 0
        peak_memory.reset()
        drain(prior.device)
        clock[0] = time.perf_counter()
        with recorder:
            prior.sample_latents(n, sampler_cond, generator, callback=after_step, **options)

    peak_memory = PeakMemory(prior.device)
    warm_s = timed(forward, 1) + timed(sampling, 1)  # warm-up (with --compile, the compilation)
    recorded = any(paired_forward_s) and (rows_run[0] > 0 or replayed_by_prior[0])
    paired = paired or recorded
    fwd, samp, ratios = [], [], []
    run_s: list[float] = []
    for _ in range(args.repeats):  # interleaved so drift affects both
        if paired:
            run_s.append(timed(sampling, 1))
            pairs = [(s, f) for s, f in zip(step_times, paired_forward_s) if f > 0]  # steps that ran the network
            fwd += [f for _, f in pairs]
            samp += [s for s, _ in pairs]
            ratios += [s / f for s, f in pairs]
        else:
            fwd.append(timed(forward, 3) / per_call)
            run_s.append(timed(sampling, 1))
            samp.append(run_s[-1] / max(1, len(step_times)))  # per step run (samples may stop early)
            ratios.append(samp[-1] / fwd[-1])
    ratios.sort()
    result = {"batch": n, "steps": options.get("steps"), "options": options, "steps_run": len(step_times),
              "guidance": args.guidance, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "paired_per_step": paired, "replayed_inputs": recorded,
              "forward_s": statistics.median(fwd), "step_s": statistics.median(samp),
              "step_over_forward": statistics.median(ratios),
              "step_over_forward_quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]}
    if rows_run[0]:  # the doubled batch of guidance counts twice
        result["network_rows_per_image"] = rows_run[0] / n
    result["peak_memory_mib"] = peak_memory.mib()
    if args.compile:  # the first run's time beyond a compiled run's
        result["compile_s"] = warm_s - statistics.median(run_s) - timed(forward, 1)
    result["images_per_s"] = n / max(sum(step_times), 1e-12)  # the last run's sampling time, paired forwards apart
    result["environment"] = environment(prior)
    report(result, args)
    return 0


def environment(prior) -> dict:
    """Where the figures were measured."""
    import platform

    return {"device": str(prior.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


FIGURES = ("forward_s", "step_s", "step_over_forward", "images_per_s")
TRAINING_FIGURES = ("cache_images_per_s", "pixels_images_per_s", "cache_tokens_per_s", "pixels_tokens_per_s",
                    "cache_over_pixels")


def report(result: dict, args: argparse.Namespace, figures: tuple[str, ...] = FIGURES) -> None:
    """Print the result; with --out write it (JSON and a markdown table); with --compare print the ratios of its
    figures to an earlier run's."""
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        rows = [(k, f"{result[k]:.4g}") for k in figures]
        rows += [(k, result[k]) for k in ("batch", "steps_run", "guidance", "steps") if k in result]
        rows += [(k, v) for k, v in result["environment"].items()]
        table = ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
        out.with_suffix(".md").write_text("\n".join(table) + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        print(f"against {args.compare}:")
        for key in figures:
            if isinstance(old.get(key), (int, float)) and old[key]:
                print(f"  {key}: {result[key] / old[key]:.3f} x ({result[key]:.4g} against {old[key]:.4g})")


if __name__ == "__main__":
    sys.exit(run(main))
