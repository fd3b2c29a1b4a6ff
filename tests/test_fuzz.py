"""Fuzzing the entrypoints with broken inputs: every mutation of a valid config or checkpoint must end in a
one-paragraph `error: ...` that names the problem (exit status 2, through `ldm.cli.run` as the programs run),
never a traceback, never a run that goes ahead, and nothing may be written.

Configs (the tiny VQ, KL and absorbing ones) are mutated at every key path: a required key dropped, every key
misspelt, a number, boolean or list retyped to a string, a positive number negated, a `target` pointed at code
(`os.system`, ...) or at a real but wrong class; `main.py` must refuse each before it claims a run folder.
Checkpoints (a first stage and a prior, trained for a step by `main.py`) are truncated, have bytes flipped,
carry a changed config or tensors of the wrong shape, or are of the other kind; `scripts/sample.py`,
`scripts/eval_first_stage.py` and `main.py -r` must refuse them. `pytest -s` prints the tally per kind.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ldm.checkpoint import read_checkpoint
from ldm.cli import run
from ldm.first_stage.modules import Decoder, Encoder
from ldm.train import main as train_main
from ldm.util import accepted_parameters, get_obj_from_str
from tests.test_scripts import load

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "test"
CODE_TARGETS = ("os.system", "subprocess.Popen", "builtins.eval", "importlib.import_module")
WRONG_CLASS = "torch.nn.Linear"  # a real, allowed class that is not what any node expects
SEED = 0
KeyPath = tuple[str, ...]


# --- running a case and judging its outcome ---------------------------------------------------------------
@dataclass
class Case:
    kind: str  # drop, misspell, retype, negate, retarget, truncate, flip, ...
    label: str  # what was done, for the report
    names: tuple[str, ...]  # what the error message must mention, all of them
    path: KeyPath = ()  # the mutated key, for config cases
    config: dict | None = None  # the mutated config, where the error's key must lead


@dataclass
class Tally:
    """Outcomes per mutation kind; `failures` describes every case that did not end in a clear error."""

    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    failures: list[str] = field(default_factory=list)
    COLUMNS = ("tried", "clear error", "traceback", "silent", "unclear", "wrote")

    def add(self, kind: str, outcome: str, detail: str) -> None:
        self.counts[kind]["tried"] += 1
        self.counts[kind][outcome] += 1
        if outcome != "clear error":
            self.failures.append(f"[{outcome}] {detail}")

    def table(self, title: str) -> str:
        total = sum(self.counts.values(), Counter())
        rows = [(title, *self.COLUMNS)] + [(k, *(c[col] for col in self.COLUMNS)) for k, c in self.counts.items()]
        rows.append(("total", *(total[col] for col in self.COLUMNS)))
        return "\n".join(f"{r[0]:<22}" + "".join(f"{v:>12}" for v in r[1:]) for r in rows)

    def check(self, title: str, capsys) -> None:
        with capsys.disabled():
            print(f"\n{self.table(title)}")
        assert not self.failures, "\n".join(self.failures)


def classify(case: Case, call: Callable[[], Any], written: Callable[[], list[Path]], capsys) -> tuple[str, str]:
    """(outcome, detail) of one case: `clear error` (status 2, one paragraph `error: ...` naming every one of
    `case.names`, nothing written), `traceback` (an exception escaped), `silent` (status 0), `wrote` (refused
    but left files behind) or `unclear` (any other refusal)."""
    capsys.readouterr()
    try:
        status = run(call)
    except (Exception, SystemExit) as e:  # what escapes run() is a traceback to the user
        return "traceback", f"{case.label}: {type(e).__name__}: {str(e)[:300]}"
    err = capsys.readouterr().err
    if status == 0:
        return "silent", f"{case.label}: accepted"
    files = written()
    if files:
        return "wrote", f"{case.label}: refused ({err.strip()[:200]}) but wrote {[str(f) for f in files[:3]]}"
    one_paragraph = err.startswith("error: ") and err.endswith("\n") and "\n\n" not in err and "Traceback" not in err
    missing = [n for n in case.names if n not in err]
    if case.config is not None and not leads_into(case.config, err[len("error: "):].split(": ", 1)[0]):
        missing.append("a key of the config")
    if status != 2 or not one_paragraph or missing:
        return "unclear", f"{case.label}: status {status}, does not name {missing}: {err.strip()[:300]}"
    return "clear error", ""


def leads_into(config: dict, key: str) -> bool:
    """Whether a dotted key is a path in `config`, but for its last part (a key that is missing or misspelt)."""
    node: Any = config
    for part in key.split(".")[:-1]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def files_under(folder: Path) -> Callable[[], list[Path]]:
    return lambda: sorted(folder.rglob("*")) if folder.exists() else []


# --- config mutations -------------------------------------------------------------------------------------
def walk(node: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """(key path, value) of every mapping entry in the tree, parents before children."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, k), v
            yield from walk(v, (*path, k))


def get(tree: Any, path: KeyPath) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def dotted(path: KeyPath) -> str:
    return ".".join(map(str, path))


# (node, parameter) pairs a signature requires that a config may leave out: a prior builds its frozen first
# stage without a training loss.
NOT_REQUIRED = {("first_stage_config", "lossconfig")}


def required_keys(config: dict) -> Iterator[KeyPath]:
    """Keys a config cannot do without: the sections and the training split, every node's `target`, the
    parameters without a default, the first stage's `ddconfig` keys its encoder or decoder needs."""
    yield from (("model",), ("data",), ("data", "params", "train"))
    for path, value in walk(config):
        if isinstance(value, dict) and "target" in value:
            yield (*path, "target")
            for name in accepted_parameters(get_obj_from_str(value["target"]))[1]:
                if name in (value.get("params") or {}) and (path[-1], name) not in NOT_REQUIRED:
                    yield (*path, "params", name)
        if path[-1] == "ddconfig":
            needed = set(accepted_parameters(Encoder)[1]) | set(accepted_parameters(Decoder)[1])
            yield from ((*path, k) for k in value if k in needed)


def misspelt(key: str, rng: random.Random) -> str:
    """`key` with two neighbouring letters swapped or one letter dropped (never `key` itself)."""
    while True:
        i = rng.randrange(len(key))
        if rng.random() < 0.5 and i + 1 < len(key):
            new = key[:i] + key[i + 1] + key[i] + key[i + 2:]
        else:
            new = key[:i] + key[i + 1:]
        if new and new != key:
            return new


def is_label(path: KeyPath) -> bool:
    """Keys the user names freely (a callback's name), where any spelling is valid."""
    return len(path) == 3 and path[:2] == ("lightning", "callbacks")


# Values the command line's --max_steps replaces (a negative one would be Lightning's "no limit" anyway).
OVERRIDDEN = {("lightning", "trainer", "max_steps")}
DROP = object()


def changed(config: dict, path: KeyPath, value: Any = DROP, key: str | None = None) -> dict:
    """A copy of `config` with the entry at `path` dropped, set to `value`, or renamed to `key`."""
    new = copy.deepcopy(config)
    parent, old = get(new, path[:-1]), path[-1]
    if key is not None:
        parent[key] = parent.pop(old)
    elif value is DROP:
        del parent[old]
    else:
        parent[old] = value
    return new


def config_mutations(config: dict) -> Iterator[tuple[Case, dict]]:
    """(case, mutated config) for every mutation of `config`, in a fixed order. An error must name the
    mutated key's node and the key (or the new name, or the new target)."""
    rng = random.Random(SEED)
    for path in required_keys(config):
        yield Case("drop", f"drop {dotted(path)}", (dotted(path[:-1]), path[-1]), path), changed(config, path)
    for path, _ in walk(config):
        if not is_label(path):
            key = misspelt(str(path[-1]), rng)
            yield Case("misspell", f"misspell {dotted(path)} -> {key}", (dotted(path[:-1]), key), path), \
                changed(config, path, key=key)
    for path, value in walk(config):
        if isinstance(value, (int, float, bool, list)) and path not in OVERRIDDEN:
            yield Case("retype", f"retype {dotted(path)}: {value!r} -> 'abc'", (dotted(path[:-1]), path[-1]), path), \
                changed(config, path, "abc")
    for path, value in walk(config):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and path not in OVERRIDDEN:
            yield Case("negate", f"negate {dotted(path)}: {value!r} -> {-value!r}", (dotted(path[:-1]), path[-1]),
                       path), changed(config, path, -value)
    for path, _ in walk(config):
        if path[-1] == "target":
            for target in (*CODE_TARGETS, WRONG_CLASS):
                yield Case("retarget", f"retarget {dotted(path)} -> {target}",
                           (dotted(path[:-1]), target.rsplit(".", 1)[-1]), path), changed(config, path, target)


CONFIG_NAMES = ["first_stage_vq", "first_stage_kl", "absorbing", "imagebart"]


def load_config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def fuzzed_before(name: str, section: str) -> bool:
    """A section identical to that of a config earlier in CONFIG_NAMES (the tiny configs share their data and
    lightning sections): its mutations were tried there."""
    mine = load_config(name).get(section)
    return any(load_config(e).get(section) == mine for e in CONFIG_NAMES[:CONFIG_NAMES.index(name)])


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_mutations_end_in_a_clear_error(name, tmp_path, capsys):
    results = Tally()
    skip = {s for s in ("model", "data", "lightning") if fuzzed_before(name, s)}
    cases = [(c, m) for c, m in config_mutations(load_config(name)) if c.path[0] not in skip]
    for i, (case, mutated) in enumerate(cases):
        case.config = mutated
        path, logs = tmp_path / f"case{i}.yaml", tmp_path / f"logs{i}"
        path.write_text(yaml.safe_dump(mutated))
        argv = ["--base", str(path), "-t", "-l", str(logs), "--max_steps", "1", "--no-test"]
        results.add(case.kind, *classify(case, lambda argv=argv: train_main(argv), files_under(logs), capsys))
    results.check(f"config {name}", capsys)


# --- checkpoint mutations ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run folders of a first stage and a prior trained by main.py for one step, with last.ckpt."""
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for kind, config in (("first_stage", "first_stage_vq"), ("prior", "absorbing")):
        logs = root / kind
        assert train_main(["--base", str(CONFIGS / f"{config}.yaml"), "-t", "-l", str(logs), "--max_steps", "1",
                           "--no-test=true", "lightning.checkpoint_every_n_steps=1"]) == 0
        (folders[kind],) = logs.iterdir()
        assert (folders[kind] / "checkpoints" / "last.ckpt").is_file()
    return folders


def payload_offsets(path: Path) -> dict[str, int]:
    """Where a torch.save zip keeps its parts: the pickle's bytes, the largest tensor's, the central directory."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        start_dir = z.start_dir
    raw = path.read_bytes()

    def data_start(info: zipfile.ZipInfo) -> int:  # after the local header and its variable fields
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
        return info.header_offset + 30 + name_len + extra_len

    pickle = next(i for i in infos if i.filename.endswith("data.pkl"))
    tensor = max(infos, key=lambda i: i.file_size)
    return {"zip signature": 0, "pickle": data_start(pickle) + pickle.file_size // 2,
            "largest tensor": data_start(tensor) + tensor.file_size // 2, "central directory": start_dir + 20}


def byte_cases(source: Path, out: Path) -> Iterator[tuple[Case, Path]]:
    """The checkpoint cut short at several lengths, and with one byte flipped in each of its parts."""
    raw = source.read_bytes()
    for n in (0, 100, len(raw) // 2, len(raw) - 10):
        path = out / f"truncated{n}.ckpt"
        path.write_bytes(raw[:n])
        yield Case("truncate", f"{out.name}: truncated to {n} of {len(raw)} bytes", (path.name, "corrupt")), path
    for part, offset in payload_offsets(source).items():
        path = out / f"flipped{offset}.ckpt"
        damaged = bytearray(raw)
        damaged[offset] ^= 0xFF
        path.write_bytes(damaged)
        yield Case("flip", f"{out.name}: byte {offset} flipped ({part})", (path.name, "corrupt")), path


def rewritten(source: Path, path: Path, change: Callable[[dict], Any]) -> Path:
    """`source` with `change` applied to its stored object, saved at `path`."""
    ckpt = read_checkpoint(source)
    change(ckpt)
    torch.save(ckpt, path)
    return path


def config_cases(source: Path, out: Path, node: KeyPath, targets: tuple[str, ...], required: str,
                 param: str) -> Iterator[tuple[Case, Path]]:
    """The checkpoint with the config node at `node` changed: its target pointed at each of `targets`, its
    parameter `required` dropped, its parameter `param` misspelt."""
    config, params, stem = ("config", *node), ("config", *node, "params"), out / node[-1]
    for target in targets:
        ckpt = rewritten(source, Path(f"{stem}_{target}.ckpt"), lambda c, t=target: set_in(c, (*config, "target"), t))
        yield Case("stored config", f"{out.name}: config {dotted(node)}.target -> {target}",
                   (target.rsplit(".")[-1],)), ckpt
    ckpt = rewritten(source, Path(f"{stem}_dropped.ckpt"), lambda c: get(c, params).pop(required))
    yield Case("stored config", f"{out.name}: config {dotted(node)}.params.{required} dropped",
               (f"{dotted(node)}.params", required)), ckpt
    bad = param[:2] + param[3:]
    ckpt = rewritten(source, Path(f"{stem}_misspelt.ckpt"), lambda c: set_in(c, (*params, bad), get(c, params).pop(param)))
    yield Case("stored config", f"{out.name}: config {dotted(node)}.params.{param} -> {bad}",
               (f"{dotted(node)}.params", bad)), ckpt


def set_in(tree: dict, path: KeyPath, value: Any) -> None:
    get(tree, path[:-1])[path[-1]] = value


def used_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """State-dict keys of what inference uses (the first stage's loss and discriminator may be left as built)."""
    return [k for k in state if not k.startswith(("loss.", "first_stage_model.loss."))]


def shape_cases(source: Path, out: Path) -> Iterator[tuple[Case, Path]]:
    """The checkpoint with a tensor of another shape: the first one inference uses, and the largest."""
    state = read_checkpoint(source)["state_dict"]
    used = used_tensors(state)
    for i, key in enumerate((used[0], max(used, key=lambda k: state[k].numel()))):
        ckpt = rewritten(source, out / f"shape{i}.ckpt",
                         lambda c, k=key: c["state_dict"].__setitem__(k, torch.zeros(*c["state_dict"][k].shape, 2)))
        yield Case("tensor shape", f"{out.name}: state_dict[{key!r}] of another shape", (key, "shape")), ckpt


SAMPLE = ("sample", ["-n", "1", "steps=1", "--out", "{out}/grid.png"])
EVAL_FIRST_STAGE = ("eval_first_stage", ["--split", "validation", "--limit", "2", "--classifier", "",
                                         "--out", "{out}/metrics.json"])


def refuse_checkpoints(cases: list[tuple[Case, Path]], script: tuple[str, list[str]], tmp_path: Path,
                       results: Tally, capsys) -> None:
    """Each checkpoint through the script's main; nothing may appear next to it or in the output folder."""
    module = load(script[0])
    for case, ckpt in cases:
        out = tmp_path / "out" / f"{script[0]}_{ckpt.parent.name}_{ckpt.stem}"
        argv = ["-r", str(ckpt), *(a.format(out=out) for a in script[1])]
        before = sorted(ckpt.parent.iterdir())

        def written(out=out, ckpt=ckpt, before=before) -> list[Path]:
            return files_under(out)() + sorted(set(ckpt.parent.iterdir()) - set(before))

        case = dataclasses.replace(case, label=f"{script[0]}.py: {case.label}")
        results.add(case.kind, *classify(case, lambda argv=argv: module.main(argv), written, capsys))


def test_damaged_checkpoints_are_refused_by_the_scripts(runs, tmp_path, capsys):
    results = Tally()
    for kind, scripts in (("prior", [SAMPLE]), ("first_stage", [EVAL_FIRST_STAGE, SAMPLE])):
        out = tmp_path / kind
        out.mkdir()
        cases = list(byte_cases(runs[kind] / "checkpoints" / "last.ckpt", out))
        for script in scripts:
            refuse_checkpoints(cases, script, tmp_path, results, capsys)
    results.check("damaged checkpoints", capsys)


def test_checkpoints_with_a_changed_config_or_weights_are_refused(runs, tmp_path, capsys):
    results = Tally()
    prior, first_stage = (runs[k] / "checkpoints" / "last.ckpt" for k in ("prior", "first_stage"))
    for name in ("prior", "first_stage"):
        (tmp_path / name).mkdir()
    prior_cases = [
        *config_cases(prior, tmp_path / "prior", ("model",), ("os.system", WRONG_CLASS), "codebook_size",
                      "num_timesteps"),
        *config_cases(prior, tmp_path / "prior", ("model", "params", "first_stage_config"),
                      ("builtins.eval", "ldm.first_stage.models.AutoencoderKL"), "n_embed", "embed_dim"),
        *shape_cases(prior, tmp_path / "prior")]
    refuse_checkpoints(prior_cases, SAMPLE, tmp_path, results, capsys)
    first_stage_cases = [
        *config_cases(first_stage, tmp_path / "first_stage", ("model",),
                      ("subprocess.Popen", WRONG_CLASS, "ldm.first_stage.models.AutoencoderKL"), "n_embed", "embed_dim"),
        *shape_cases(first_stage, tmp_path / "first_stage")]
    refuse_checkpoints(first_stage_cases, EVAL_FIRST_STAGE, tmp_path, results, capsys)
    refuse_checkpoints([(Case("other kind", "a first-stage checkpoint", ("first-stage", "sample.py needs a prior")),
                         first_stage)], SAMPLE, tmp_path, results, capsys)
    refuse_checkpoints([(Case("other kind", "a prior checkpoint", ("prior", "eval_first_stage.py needs a first stage")),
                         prior)], EVAL_FIRST_STAGE, tmp_path, results, capsys)
    results.check("changed checkpoints", capsys)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_resuming_from_a_damaged_checkpoint_is_refused(runs, tmp_path, capsys):
    results = Tally()
    source = runs["prior"]
    key = used_tensors(read_checkpoint(source / "checkpoints" / "last.ckpt")["state_dict"])[-1]
    damage = {"truncate": lambda p: p.write_bytes(p.read_bytes()[:1000]),
              "tensor shape": lambda p: rewritten(p, p, lambda c: c["state_dict"].__setitem__(key, torch.zeros(3, 3)))}
    for kind, spoil in damage.items():
        folder = tmp_path / f"{kind.replace(' ', '_')}_{source.name}"
        shutil.copytree(source, folder)
        spoil(folder / "checkpoints" / "last.ckpt")
        before = snapshot(folder)
        case = Case(kind, f"main.py -r: {kind}", ("last.ckpt",))
        argv = ["-r", str(folder), "-t", "--max_steps", "2", "--no-test"]
        results.add(kind, *classify(case, lambda argv=argv: train_main(argv),
                                    lambda folder=folder, before=before: sorted(
                                        {Path(k) for k, v in snapshot(folder).items() if before.get(k) != v}),
                                    capsys))
    results.check("resume", capsys)


@pytest.mark.slow
def test_a_refusal_is_all_that_reaches_stderr(runs, tmp_path):
    """In fresh processes, as users run them, a refusal that comes after the prior (and x_transformers) was
    built prints its error line and nothing else: no import-time warnings, no log lines."""
    root = Path(__file__).resolve().parents[1]
    bad = rewritten(runs["prior"] / "checkpoints" / "last.ckpt", tmp_path / "bad.ckpt",
                    lambda c: c["state_dict"].__setitem__(used_tensors(c["state_dict"])[-1], torch.zeros(3)))
    for argv in (["main.py", "--base", str(CONFIGS / "absorbing.yaml"), "-t", "-l", str(tmp_path / "logs"),
                  "data.params.train.params.size=-32"],
                 ["scripts/sample.py", "-r", str(bad), "--out", str(tmp_path / "grid.png")]):
        done = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and "\n\n" not in done.stderr, done.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "grid.png").exists()
