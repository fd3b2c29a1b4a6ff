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
from dataclasses import dataclass
from typing import Annotated, Any

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


@dataclass(frozen=True)
class Bounds:
    """The range a config value must lie in, attached to a constructor's annotation
    (`n_embed: Annotated[int, Bounds(ge=1)]`, or an alias below), so it is checked with the types,
    before anything is built: `model.params.n_embed: expected an integer >= 1, got -256 (int)`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: Any) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}" if high else "any"


# Annotations for the numbers configs set: sizes and counts, step indices and counts where 0 means none,
# loss weights and thresholds, rates that must be positive, decays and probabilities below 1.
PositiveInt = Annotated[int, Bounds(ge=1)]
NonNegativeInt = Annotated[int, Bounds(ge=0)]
NonNegativeFloat = Annotated[float, Bounds(ge=0)]
PositiveFloat = Annotated[float, Bounds(gt=0)]
Fraction = Annotated[float, Bounds(ge=0, lt=1)]
Probability = Annotated[float, Bounds(ge=0, le=1)]


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


def _takes_kwargs(fn: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _forwards_to(cls: Any) -> list[Any]:
    """`cls`, then the project base classes its `**kwargs` reach (`def __init__(self, a, **kw)` that calls
    `super().__init__(**kw)`), so their parameters count as its own; stops at a class outside the project."""
    chain = [cls]
    if not inspect.isclass(cls):
        return chain
    for base in cls.__mro__[1:]:
        if "__init__" not in vars(base):
            continue  # its constructor is the next class's
        if not _takes_kwargs(chain[-1]) or base.__module__.split(".")[0] not in PROJECT_PACKAGES:
            break
        chain.append(base)
    return chain


def accepted_parameters(cls: Any) -> tuple[list[str], list[str], bool]:
    """(all parameter names, required names, accepts any **kwargs) of a callable's signature; a project class
    whose `**kwargs` go to its base class's constructor accepts the base's parameters, and no others."""
    names, required, var_kw = [], [], False
    for i, fn in enumerate(_forwards_to(cls)):
        var_kw = False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                var_kw = True
            elif p.kind is inspect.Parameter.VAR_POSITIONAL or p.name in names:
                continue
            else:
                names.append(p.name)
                if p.default is inspect.Parameter.empty and i == 0:
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
    qual = _qualified(cls)
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
        missing = [m for m in accepted_parameters(r)[1] if m not in params]
        if missing:
            raise ConfigError(key, f"{r.__name__} needs {', '.join(repr(m) for m in missing)}; keys it reads: "
                                   f"{', '.join(accepted_parameters(r)[0])}")
    for r in readers:
        hints = type_hints(r)
        check_types(hints, {k: v for k, v in params.items() if k in hints}, key)


def type_hints(cls: Any) -> dict[str, Any]:
    """The resolved annotations of a class's `__init__` (with those of the base classes its `**kwargs` reach)
    or a function's, `Annotated` bounds kept; {} where they cannot be resolved."""
    hints: dict[str, Any] = {}
    for c in reversed(_forwards_to(cls)):
        fn = c.__init__ if inspect.isclass(c) else c
        try:
            hints.update(typing.get_type_hints(fn, include_extras=True))
        except Exception:  # annotations naming what the module does not import at run time
            pass
    return hints


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
    if origin is Annotated:
        bounds = [b for b in hint.__metadata__ if isinstance(b, Bounds)]
        return _matches(hint.__origin__, value) and all(
            b.contains(value) for b in bounds if isinstance(value, (int, float)) and not isinstance(value, bool))
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
    if origin is Annotated:
        return " ".join([_describe(hint.__origin__), *(str(b) for b in hint.__metadata__ if isinstance(b, Bounds))])
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


def check_config(config: Any, key: str = "config", expected: type | None = None,
                 provided: tuple[str, ...] = ()) -> Any:
    """The class a `{target, params}` node builds, after every check that needs no building: its keys, the
    target (allowed, importable, a class, a subclass of `expected`), the parameters' names and types.
    Nodes built later (a data module's splits) are checked with it up front."""
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
    if not inspect.isclass(cls) and config["target"] not in _factories:
        raise ConfigError(f"{key}.target", f"{config['target']!r} is a {type(cls).__name__}, not a class: configs "
                                           "build classes (and functions registered with "
                                           "ldm.util.register_factory)")
    if expected is not None and not (inspect.isclass(cls) and issubclass(cls, expected)):
        raise ConfigError(f"{key}.target", f"{config['target']!r} is not a {expected.__name__} ({_qualified(expected)}), "
                                           f"which {key} must build")
    params = config.get("params")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"{key}.params", f"expected a mapping of parameter names to values, got {params!r}")
    if inspect.isclass(cls) or inspect.isfunction(cls):
        check_params(cls, dict(params or {}), key, provided=provided)
    return cls


# What a constructor raises about the values it was given. Only while building from a config are these read
# as the config's fault and reported with the node's key (ldm.cli prints them as one line); torch's own
# RuntimeErrors (a tensor of a negative size) count, a NotImplementedError or running out of memory does not.
_CONSTRUCTION_ERRORS = (ValueError, TypeError, RuntimeError)
_NOT_CONSTRUCTION_ERRORS = (NotImplementedError, RecursionError, torch.cuda.OutOfMemoryError)


def instantiate_from_config(config: Any, key: str = "config", expected: type | None = None, **extra: Any) -> Any:
    """Build `config.target(**config.params, **extra)`; bad targets or parameters name `key`.

    Nested configs built inside a constructor should pass their own key
    (``instantiate_from_config(lossconfig, key="lossconfig")``); the error then
    carries the full path, e.g. ``model.params.lossconfig.params.disc_weight``. A constructor's
    ValueError, TypeError or RuntimeError becomes a ConfigError naming `key` too (the original chained).
    """
    from ldm.checkpoint import CheckpointError

    cls = check_config(config, key, expected, provided=tuple(extra))
    params = dict(_to_plain(config).get("params") or {})
    try:
        return cls(**params, **extra)
    except ConfigError as e:
        raise e.under(f"{key}.params") from None
    except CheckpointError:
        raise  # names its file
    except _NOT_CONSTRUCTION_ERRORS:
        raise
    except _CONSTRUCTION_ERRORS as e:
        what = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{key}.params", f"{_qualified(cls)} cannot be built from these parameters: {what}") from e


def _qualified(cls: Any) -> str:
    return f"{cls.__module__}.{getattr(cls, '__qualname__', cls)}"


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
