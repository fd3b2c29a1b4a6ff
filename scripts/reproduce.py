"""Train what is missing, evaluate every prior on one first stage, and write the comparison table.

    python scripts/reproduce.py configs/repro/fmnist_table.yaml
    python scripts/reproduce.py configs/repro/fmnist_table.yaml --out results/fmnist --logdir logs evaluation.num_samples=500
    python scripts/reproduce.py configs/repro/fmnist_table.yaml --table-only

The config names the first stage(s) and every prior with its training budget (in steps) and evaluation
settings. Finished runs, latent caches, evaluations and grids are reused; a training stopped part way is
continued with `main.py -r`, an evaluation from the sample batches it kept. Writes `<out>/table.md`,
`<out>/table.json`, `<out>/fd_vs_seconds.svg` and `<out>/grids/<prior>.png`; each step's output goes to
`<out>/logs/`. Dotted `key=value` overrides of the config follow the flags.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import run  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a reproduction config, configs/repro/*.yaml")
    p.add_argument("--out", default=None, help="results folder (default: the config's `out`)")
    p.add_argument("--logdir", default=None, help="root of the training run folders (default: the config's `logdir`)")
    p.add_argument("--only", default=None, help="comma-separated priors to run (and the first stages they need)")
    p.add_argument("--table-only", action="store_true", help="write the table from what is finished; run nothing")
    p.add_argument("--progress-every", type=float, default=60.0,
                   help="seconds between status lines when the output is not a terminal")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The flags, and the dotted `key=value` overrides of the config after them."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") or "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are written key=value)")
    return args, overrides


def only(spec: Any, keys: list[str]) -> Any:
    """The spec restricted to some priors and the first stages they are trained on."""
    unknown = [k for k in keys if k not in spec.priors]
    if unknown:
        raise ValueError(f"--only: {', '.join(unknown)} not among the priors ({', '.join(spec.priors)})")
    spec.priors = {k: p for k, p in spec.priors.items() if k in keys}
    used = {p.first_stage for p in spec.priors.values()}
    spec.first_stages = {k: fs for k, fs in spec.first_stages.items() if k in used}
    return spec


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from ldm.repro.runner import Interrupted, Runner
    from ldm.repro.spec import load_spec
    from ldm.repro.steps import Plan
    from ldm.repro.table import write_table
    from ldm.run_folder import RunLock

    spec = load_spec(args.config, overrides)
    if args.only:
        spec = only(spec, args.only.split(","))
    out = Path(args.out or spec.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(spec, out, Path(args.logdir or spec.logdir))
    command = "python scripts/reproduce.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    lock = RunLock(str(out)).acquire()  # one runner per results folder
    try:
        if not args.table_only:
            try:
                Runner(plan, progress_every=args.progress_every).run()
            except Interrupted as e:
                write_table(plan, command)
                print(f"interrupted: the finished steps are kept; rerun the same command to continue ({out})")
                return 128 + e.signum if e.signum in (signal.SIGTERM, signal.SIGINT) else 1
            except RuntimeError as e:
                raise SystemExit(str(e)) from None
        write_table(plan, command)
    finally:
        lock.release()
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'fd_vs_seconds.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
