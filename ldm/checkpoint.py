"""Reading and writing weights: the one place that opens checkpoint files.

`.ckpt`/`.pt`/`.pth`/`.th` files are read with ``torch.load(weights_only=True)``; a file it refuses
for a Python object it does not know (the released Lightning 1.x checkpoints of taming-transformers
and latent-diffusion pickle callbacks, OmegaConf configs, numpy scalars) is read again with
`ldm.safe_unpickle`, which builds tensors and plain data only and never runs what the pickle names.
`.safetensors` files and HF-style sharded safetensors (an ``*.safetensors.index.json`` next to its
shards) are read with safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ldm.safe_unpickle import restricted_load

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".th")
EXPORT_HINT = (
    "The project reads tensors and plain containers only (torch.load(weights_only=True), then a restricted "
    "reader for Lightning 1.x checkpoints) and never runs a pickle's code; save the weights as a state dict "
    "or safetensors where the file is trusted (e.g. `safetensors.torch.save_file(model.state_dict(), ...)`)."
)


ZIP_SIGNATURE = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    index = json.loads(index_path.read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(index_path.parent / shard)))
    order = index.get("metadata", {}).get("key_order")
    if order:
        state = {k: state[k] for k in order if k in state} | {k: v for k, v in state.items() if k not in order}
    return state


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw object stored in a checkpoint file (a dict), loaded without unpickling code."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if indexes:
            return _load_sharded(indexes[0])
        if len(singles) == 1:
            return load_file(str(singles[0]))
        raise CheckpointError(f"{path} is a directory without a single .safetensors file or a shard index")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _load_sharded(path)
    if name.endswith(".safetensors"):
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    if name.endswith(PICKLE_SUFFIXES):
        return _read_pickle(path)
    raise CheckpointError(f"unknown checkpoint format for {path}: expected .ckpt/.pt/.pth/.th or .safetensors")


def _refusal(error: Exception) -> str | None:
    """What `weights_only=True` refused (a global it does not allow, an opcode it does not read), else None."""
    found = re.search(r"Unsupported (global|operand)\S*:? (.*?)(?: Please use|\n|$)", str(error))
    if not found:
        return None
    what = re.sub(r"^GLOBAL | was not an allowed global by default\.?$", "", found.group(2).strip())
    return f"unsupported {found.group(1)} {what}"


def _reason(error: BaseException) -> str:
    """The error's type and torch's own reason, without the advice around it."""
    text = str(error)
    after = text.split("WeightsUnpickler error:", 1)[-1]
    line = next((part.strip() for part in after.splitlines() if part.strip()), "")
    if not line and isinstance(error, EOFError):
        line = "the data ends early"
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _damaged(error: BaseException, path: Path) -> bool:
    """Whether an error reading `path` comes from the file's bytes (cut short, corrupt, not torch's): torch.save
    writes a zip (or, before torch 1.6, a pickle, which starts with its protocol byte 0x80)."""
    text = str(error).lower()
    with open(path, "rb") as f:
        head = f.read(4)
    broken_zip = head == ZIP_SIGNATURE and not zipfile.is_zipfile(path)  # no central directory
    return broken_zip or not head.startswith((ZIP_SIGNATURE, b"\x80")) or isinstance(error, EOFError) or any(
        s in text for s in ("truncated", "central directory", "zip archive", "magic number", "corrupt"))


def check_zip_checksums(path: Path) -> None:
    """Refuse a torch.save zip whose bytes changed after it was written. torch.load does not check the CRC-32
    that the zip stores for every part, so a flipped bit in a tensor would load silently as a wrong weight;
    reading the file once more costs about a second per gigabyte. Parts stored without a checksum pass."""
    bad = None
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC or not info.file_size:
                    with z.open(info) as part:  # raises at the end of a part whose checksum differs
                        while part.read(1 << 24):
                            pass
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as e:
        bad = e
    if bad is not None:
        raise CheckpointError(f"cannot read {path}: the file is truncated, corrupt or not written by torch.save "
                              f"({_reason(bad)})") from bad


def _unreadable(path: Path, error: BaseException, what: str) -> CheckpointError:
    """The error for a file neither reader could use: damaged, or intact but holding something else."""
    if _damaged(error, path):
        return CheckpointError(
            f"cannot read {path}: the file is truncated, corrupt or not written by torch.save ({_reason(error)})")
    return CheckpointError(f"cannot read {path}: {what} ({_reason(error)}). " + EXPORT_HINT.format(path=path))


def _read_pickle(path: Path) -> Any:
    """``torch.load(weights_only=True)``, then the restricted reader if only a global was refused; a zip
    (what torch.save writes) is checked against its checksums first."""
    with open(path, "rb") as f:
        if f.read(4) == ZIP_SIGNATURE:
            check_zip_checksums(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refusal(e)
        if refused is None:
            raise _unreadable(path, e, "torch.load(weights_only=True) failed") from e
    except Exception as e:
        raise _unreadable(path, e, "torch.load(weights_only=True) failed") from e
    try:
        return restricted_load(path)
    except Exception as e:
        raise _unreadable(path, e, f"torch.load(weights_only=True) refused it ({refused}) and the restricted "
                                   "reader, which builds only tensors and plain data, failed too") from e


def state_dict_in(obj: Any, source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object: Lightning's ``state_dict`` entry, ptpt's ``net``, or the
    object itself."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("net"), Mapping) and \
            not any(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["net"]  # a ptpt trainer checkpoint (sundae-vqgan's): the network under "net"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state_dict(path: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensor state dict in a checkpoint file (unwrapping Lightning's ``state_dict``).

    With `prefix` (e.g. ``"first_stage_model."``) only keys under it are kept, prefix removed.
    """
    state = state_dict_in(read_checkpoint(path), path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{path} has no parameters under the prefix {prefix!r}")
    return state


def drop_keys(state: Mapping[str, torch.Tensor], ignore_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove every key that starts with one of `ignore_keys` (the anchors' convention)."""
    ignore = tuple(ignore_keys)
    return {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}


def load_into(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Strictly load `state` into `module`; a mismatch names the keys and shapes that differ.

    `allow_missing`/`allow_unexpected` are key prefixes tolerated on either side (for example the
    loss and discriminator of a first stage, which inference does not need).
    """
    own = module.state_dict()
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    missing = [k for k in own if k not in state and not (allow_missing and k.startswith(allow_missing))]
    unexpected = [k for k in state if k not in own and not (allow_unexpected and k.startswith(allow_unexpected))]
    misfit = {k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)}
    # a key that may be missing may also differ in shape: it is then left as initialised
    skipped = {k for k in misfit if allow_missing and k.startswith(allow_missing)}
    shape = [
        f"{k}: {tuple(state[k].shape)} in {source}, {tuple(own[k].shape)} in {type(module).__name__}"
        for k in own
        if k in misfit and k not in skipped
    ]
    if missing or unexpected or shape:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        if shape:
            lines.append(f"  {len(shape)} shape mismatch(es): " + "; ".join(shape[:5]))
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(missing[:8]))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:8]))
        raise CheckpointError("\n".join(lines))
    module.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)


def check_shapes(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict with tensors of other shapes than `module`'s under the same names (missing or extra
    keys are left to the loader, which may convert them): a resumed run checks its checkpoint with this before
    it touches the run folder, instead of failing inside Lightning's loading."""
    own = module.state_dict()
    shape = [f"{k}: {tuple(v.shape)} in {source}, {tuple(own[k].shape)} in {type(module).__name__}"
             for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shape:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: {len(shape)} shape mismatch(es): "
                              + "; ".join(shape[:5]))


def export_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a state dict as safetensors (contiguous copies; shared storage is duplicated)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def export_weights(path: str | os.PathLike, name: str | os.PathLike, config: Mapping[str, Any] | None = None,
                   ema: bool = False) -> tuple[Path, Path | None]:
    """`<name>.safetensors` (the checkpoint's state dict; with `ema` the averaged weights as the model's) and
    `<name>.yaml` (`config`, else the one stored in the checkpoint; none when neither exists), which every
    script reads as one checkpoint. Each file is written whole or not at all."""
    from omegaconf import OmegaConf

    from ldm.ema import ema_state_dict

    path, name = Path(path), str(name).removesuffix(".safetensors")
    obj = read_checkpoint(path)
    state = state_dict_in(obj, path)
    if not state:
        raise CheckpointError(f"{path} holds no tensors to export")
    if ema:
        state, replaced = ema_state_dict(state)
        if not replaced:
            raise CheckpointError(f"{path} has no EMA weights (model_ema.*) matching its parameters")
    if config is None:
        stored = obj.get("config") if isinstance(obj, Mapping) else None
        config = dict(stored) if isinstance(stored, Mapping) and "model" in stored else None
    meta = {"source": path.name}
    if isinstance(obj, Mapping):
        meta.update({k: obj[k] for k in ("global_step", "epoch") if isinstance(obj.get(k), int)})
    weights, yaml_path = Path(f"{name}.safetensors"), Path(f"{name}.yaml")
    weights.parent.mkdir(parents=True, exist_ok=True)
    if config is not None:  # the config first: the weights' existence is what marks a finished export
        tmp = yaml_path.with_name(f".{yaml_path.name}.{os.getpid()}.tmp")
        OmegaConf.save(OmegaConf.create(dict(config)), tmp)
        os.replace(tmp, yaml_path)
    tmp = weights.with_name(f".{weights.stem}.{os.getpid()}.tmp.safetensors")
    export_safetensors(state, tmp, metadata=meta)
    os.replace(tmp, weights)
    return weights, (yaml_path if config is not None else None)


def config_from_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The resolved config that `main.py` stores inside every checkpoint."""
    return _stored_config(read_checkpoint(path), path)


def _stored_config(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The config main.py stored in the checkpoint, or, for weights exported as `<name>.safetensors`, the
    `<name>.yaml` that `scripts/export_weights.py` wrote beside them."""
    config = obj.get("config") if isinstance(obj, Mapping) else None
    if isinstance(config, Mapping) and "model" in config:
        return dict(config)
    beside = Path(str(path).removesuffix(".safetensors") + ".yaml") if str(path).endswith(".safetensors") else None
    if beside is not None and beside.exists():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(beside), resolve=True)
        if isinstance(config, dict) and "model" in config:
            return config
        raise CheckpointError(f"{beside}, the config beside {path}, has no model section")
    where = f" and no {beside.name} lies beside it" if beside is not None else ""
    raise CheckpointError(f"{path} carries no config (it was not written by main.py{where}); pass the config "
                          "explicitly")


def _without_ckpt_paths(node: Any) -> Any:
    """A config with every `ckpt_path` removed: the checkpoint being loaded holds all the weights."""
    if isinstance(node, Mapping):
        return {k: _without_ckpt_paths(v) for k, v in node.items() if k != "ckpt_path"}
    if isinstance(node, list):
        return [_without_ckpt_paths(v) for v in node]
    return node


def _first_stage_ckpt(model_config: Mapping[str, Any]) -> str | None:
    """The `ckpt_path` a prior config's first stage names, if any."""
    first_stage = (model_config.get("params") or {}).get("first_stage_config") or {}
    named = (first_stage.get("params") or {}).get("ckpt_path")
    return str(named) if named else None


def check_config_matches(obj: Any, path: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """A config given for a checkpoint that carries its own must build the same class (`model.target`)."""
    stored = obj.get("config") if isinstance(obj, Mapping) else None
    if not isinstance(stored, Mapping) or not isinstance(stored.get("model"), Mapping):
        return
    theirs, ours = stored["model"].get("target"), (config.get("model") or {}).get("target")
    if theirs and ours and theirs != ours:
        raise CheckpointError(f"{path} is a checkpoint of {theirs}, but the config given builds {ours}; give the "
                              f"config it was trained with (or none: the checkpoint carries its own)")


def instantiate_from_checkpoint(
    path: str | os.PathLike, config: Mapping[str, Any] | None = None, use_ema: bool = True,
    check_class: Callable[[type], None] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the model a checkpoint was trained with and load its weights, EMA copies included.

    A prior samples with its EMA copies by default (`prior.sample(..., use_ema=True)`). A first stage
    with an EMA gets the averaged weights loaded as its weights when `use_ema`. Training-only
    `loss.*` modules (discriminator, perceptual net) may be absent on either side. `check_class` sees
    the model's class before anything is built (a script refusing a checkpoint of the wrong kind).
    """
    from ldm.util import get_obj_from_str, instantiate_from_config

    if str(path).endswith((".yaml", ".yml")):  # a sampling config that assembles checkpoints (ImageBART's scales)
        return _from_sampling_config(path, check_class)
    obj = read_checkpoint(path)  # once: the config and the weights both come from it
    given = config is not None
    config = dict(config) if given else _stored_config(obj, path)
    if check_class is not None:
        check_class(get_obj_from_str((config.get("model") or {}).get("target"), key="model.target"))
    check_config_matches(obj, path, config)
    model_config = _without_ckpt_paths(config["model"])
    named = _first_stage_ckpt(config["model"]) if given else None
    if named and Path(named).is_file():  # the config's own first stage, to compare with the checkpoint's
        model_config["params"]["first_stage_config"]["params"]["ckpt_path"] = named
    model = instantiate_from_config(model_config, key="model")
    state = state_dict_in(obj, path)
    del obj
    if hasattr(model, "check_networks_in"):  # a prior: another's weights or first stage in one sentence
        model.check_networks_in(state, str(path))
        model.check_first_stage_in(state, str(path))
    training_only = ("loss.", "first_stage_model.loss.")
    load_into(model, state, source=str(path), allow_missing=("loss.",), allow_unexpected=training_only)
    if hasattr(model, "sync_ema_buffers"):
        model.sync_ema_buffers()
    if use_ema and hasattr(model, "load_ema_as_weights"):
        model.load_ema_as_weights()
    model.eval()
    return model, config


def subclass_of(base: type, source: str, what: str) -> Callable[[type], None]:
    """A `check_class` for the checkpoints a sampling config assembles: each must hold a `base`."""
    def check(found: type) -> None:
        if not (isinstance(found, type) and issubclass(found, base)):
            raise CheckpointError(f"{source}: a checkpoint is of {getattr(found, '__name__', found)}, not {what}")

    return check


def _from_sampling_config(path: str | os.PathLike, check_class: Callable[[type], None] | None
                          ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """`model: {target: <prior class>, params: {...}}` in a YAML file, built by the class's `from_sampling_config`
    (which loads the checkpoints the params name); the config returned is the one those checkpoints share."""
    from omegaconf import OmegaConf

    from ldm.util import get_obj_from_str

    if not Path(path).is_file():
        raise CheckpointError(f"sampling config not found: {path}")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    model_node = node.get("model") if isinstance(node, dict) else None
    if not isinstance(model_node, dict) or "target" not in model_node:
        raise CheckpointError(f"{path} is not a sampling config: it needs model.target and model.params")
    cls = get_obj_from_str(model_node["target"], key="model.target")
    if check_class is not None:
        check_class(cls)
    if not hasattr(cls, "from_sampling_config"):
        raise CheckpointError(f"{path}: {model_node['target']} is not built from a sampling config; pass its "
                              "checkpoint instead")
    return cls.from_sampling_config(dict(model_node.get("params") or {}), str(path))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash of a checkpoint: what a latent cache records about the first stage that built it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
