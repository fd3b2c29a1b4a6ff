"""Config instantiation and small helpers shared by every package.

Every object in a config is ``{target: dotted.path, params: {...}}``. Errors name the
config key, the class and what it accepts, so a typo in a YAML file is a one-line fix.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import types
import typing
from collections import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

# Keys a `{target, params}` node may carry besides those two (the anchors put the
# learning rate next to the model's target).
_NODE_EXTRA_KEYS = {"base_learning_rate"}


class ConfigError(ValueError):
    """A config node that cannot be built; `key` is its dotted path in the config."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}")

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}", self.detail)


def _to_plain(config: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, (DictConfig, ListConfig)):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return config


# What a config may build: classes from these packages (and registered factory functions). A config
# that names anything else (`os.system`, `subprocess.Popen`, `builtins.eval`, ...) is refused before
# its module is even imported, so neither a YAML file nor the config stored in a checkpoint can run
# code. The user widens the list on purpose: `main.py --allow-target pkg.module` or the environment
# variable LDM_ALLOW_TARGETS=pkg.a,pkg.b; a checkpoint never can.
PROJECT_PACKAGES = ("ldm", "absorbing", "imagebart", "sundae")
ALLOWED_LIBRARIES = ("torch.nn", "torch.optim", "torchvision.models", "torchvision.transforms", "x_transformers",
                     "pytorch_lightning.callbacks", "lightning.pytorch.callbacks")
ALLOW_ENV = "LDM_ALLOW_TARGETS"
_user_allowed: list[str] = []
_factories: set[str] = set()


def allow_targets(prefixes: Iterable[str]) -> None:
    """Let configs build classes from more packages (the user's own code), for this process."""
    for prefix in prefixes:
        prefix = prefix.strip().rstrip(".")
        if prefix and prefix not in _user_allowed:
            _user_allowed.append(prefix)


def register_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: a function that configs may name as a `target` (only classes may, otherwise)."""
    _factories.add(f"{fn.__module__}.{fn.__qualname__}")
    return fn


def allowed_prefixes() -> tuple[str, ...]:
    env = [p for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()]
    return PROJECT_PACKAGES + ALLOWED_LIBRARIES + tuple(_user_allowed) + tuple(p.strip() for p in env)


def check_target_allowed(string: str, key: str) -> None:
    """Refuse a target outside the allowed packages, before anything is imported."""
    prefixes = allowed_prefixes()
    if not any(string == p or string.startswith(p + ".") for p in prefixes):
        module = string.rsplit(".", 1)[0]
        raise ConfigError(key, f"target {string!r} is not allowed: configs build classes from this project "
                               f"({', '.join(PROJECT_PACKAGES)}) and {', '.join(ALLOWED_LIBRARIES)}; to build "
                               f"your own class, allow its package on purpose (main.py --allow-target {module}, "
                               f"or {ALLOW_ENV}={module})")


def get_obj_from_str(string: str, key: str = "target") -> Any:
    """Import `package.module.Name` from an allowed package; a failure names the config key."""
    if not isinstance(string, str) or "." not in string:
        raise ConfigError(key, f"expected a dotted path like 'package.module.Class', got {string!r}")
    check_target_allowed(string, key)
    module_name, attr = string.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(key, f"cannot import module {module_name!r} for target {string!r} ({e})") from e
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(key, f"module {module_name!r} has no attribute {attr!r}{hint}")
    return getattr(module, attr)


def accepted_parameters(cls: Any) -> tuple[list[str], list[str], bool]:
    """(all parameter names, required names, accepts **kwargs) of a callable's signature."""
    sig = inspect.signature(cls)
    names, required, var_kw = [], [], False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        else:
            names.append(p.name)
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
    return names, required, var_kw


def _unknown(names: list[str], given: Iterable[str]) -> list[str]:
    """The given names not in `names`, each with a close match when there is one."""
    hints = []
    for u in given:
        if u not in names:
            close = difflib.get_close_matches(u, names, n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return hints


def check_params(cls: Any, params: Mapping[str, Any], key: str, provided: tuple[str, ...] = (),
                 nested: bool = True) -> None:
    """Raise a ConfigError naming `key`, the class and its accepted parameters on a bad `params`: an
    unknown or missing name, or a value of the wrong type. `nested`: the parameters sit under
    `<key>.params` (a `{target, params}` node), else directly under `key` (e.g. `lightning.trainer`)."""
    names, required, var_kw = accepted_parameters(cls)
    qual = f"{cls.__module__}.{getattr(cls, '__qualname__', cls)}"
    where = f"{key}.params" if nested else key
    unknown = [] if var_kw else _unknown(names, params)
    if unknown:
        raise ConfigError(where, f"{qual} does not accept {', '.join(unknown)}; accepted parameters: {', '.join(names)}")
    missing = [r for r in required if r not in params and r not in provided]
    if missing:
        raise ConfigError(where, f"{qual} needs {', '.join(repr(m) for m in missing)}; accepted parameters: "
                                 f"{', '.join(names)}")
    check_types(type_hints(cls), params, where)


def check_nested(params: Mapping[str, Any], readers: Iterable[Any], key: str) -> None:
    """A plain dict handed to several constructors as `**params` (e.g. `ddconfig` to the encoder and the
    decoder, which ignore each other's keys): every key must be read by one of them, with its type."""
    readers = list(readers)
    names = sorted({n for r in readers for n in accepted_parameters(r)[0]})
    unknown = _unknown(names, params)
    if unknown:
        who = " and ".join(r.__name__ for r in readers)
        raise ConfigError(key, f"{who} do not read {', '.join(unknown)}; keys they read: {', '.join(names)}")
    for r in readers:
        hints = type_hints(r)
        check_types(hints, {k: v for k, v in params.items() if k in hints}, key)


def type_hints(cls: Any) -> dict[str, Any]:
    """The resolved annotations of a class's `__init__` (or a function's); {} where they cannot be resolved."""
    fn = cls.__init__ if inspect.isclass(cls) else cls
    try:
        return typing.get_type_hints(fn)
    except Exception:  # annotations naming what the module does not import at run time
        return {}


def check_types(hints: Mapping[str, Any], params: Mapping[str, Any], where: str) -> None:
    """A value whose type contradicts its annotation gets a ConfigError naming its key and the expected type.
    Only plain types are judged (numbers, strings, booleans, sequences, mappings, literals, unions of
    them); anything else (classes, callables, tensors) passes."""
    for name, value in params.items():
        hint = hints.get(name)
        if hint is not None and not _matches(hint, value):
            raise ConfigError(f"{where}.{name}", f"expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _matches(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(a, value) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if (origin or hint) in (list, tuple, Sequence, abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        items = [a for a in args if a is not Ellipsis]
        if (origin or hint) is tuple and Ellipsis not in args and items:
            return len(items) == len(value) and all(_matches(a, v) for a, v in zip(items, value))
        return len(items) != 1 or all(_matches(items[0], v) for v in value)
    if (origin or hint) in (dict, Mapping, abc.Mapping):
        return isinstance(value, Mapping)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if (origin or hint) in (list, tuple, Sequence, abc.Sequence):
        items = [_describe(a) for a in args if a is not Ellipsis]
        return "a list" + (f" of {' and '.join(items)}" if items else "")
    if (origin or hint) in (dict, Mapping, abc.Mapping):
        return "a mapping"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def instantiate_from_config(config: Any, key: str = "config", **extra: Any) -> Any:
    """Build `config.target(**config.params, **extra)`; bad targets or parameters name `key`.

    Nested configs built inside a constructor should pass their own key
    (``instantiate_from_config(lossconfig, key="lossconfig")``); the error then
    carries the full path, e.g. ``model.params.lossconfig.params.disc_weight``.
    """
    config = _to_plain(config)
    if not isinstance(config, Mapping):
        raise ConfigError(key, f"expected a mapping with 'target' and 'params', got {type(config).__name__}")
    if "target" not in config:
        close = difflib.get_close_matches("target", list(config), n=1)
        hint = f" (found {close[0]!r}: misspelt?)" if close else ""
        raise ConfigError(key, f"has no 'target'{hint}; keys: {', '.join(map(str, config)) or 'none'}")
    stray = [k for k in config if k not in {"target", "params"} | _NODE_EXTRA_KEYS]
    if stray:
        raise ConfigError(key, f"unexpected key(s) {', '.join(map(repr, stray))}; a node has 'target' and 'params'")
    cls = get_obj_from_str(config["target"], key=f"{key}.target")
    params = dict(config.get("params") or {})
    if not inspect.isclass(cls) and config["target"] not in _factories:
        raise ConfigError(f"{key}.target", f"{config['target']!r} is a {type(cls).__name__}, not a class: configs "
                                           "build classes (and functions registered with "
                                           "ldm.util.register_factory)")
    if inspect.isclass(cls) or inspect.isfunction(cls):
        check_params(cls, params, key, provided=tuple(extra))
    try:
        return cls(**params, **extra)
    except ConfigError as e:
        raise e.under(f"{key}.params") from None


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
