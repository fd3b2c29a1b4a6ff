"""Sampler options declared once per prior (name, type, default, allowed values, help).

The same declaration checks the keywords of `sample` / `inpaint` before any work, prints
`scripts/sample.py --list-options`, and tells the apps which controls to build. A bound or a default
that depends on the prior (its T, its training shape) or on an option declared before it is a function
`(prior, options checked so far) -> value`; `SamplerOptions.resolve(prior)` gives concrete values.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

Mode = Literal["sample", "inpaint"]
MODES: tuple[Mode, ...] = ("sample", "inpaint")
KIND_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}


def _text(value: Any) -> str:
    """A bound or value as a user wrote it: 0 not 0.0, tuples as (8, 8)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


def config_default(name: str, builtin: Any = None) -> Any:
    """An option default read from the prior's `sample_defaults` (its config's), else `builtin`."""
    return lambda prior, _: prior.sample_defaults.get(name, builtin)


@dataclass(frozen=True)
class Option:
    """One keyword a sampler takes; `check` normalises a value or names what is allowed."""

    name: str
    type: type  # int, float or str; the element type when `size` is set
    default: Any  # what the sampler does without the option (None: see `help`)
    help: str
    low: Any = None  # inclusive lower bound (exclusive with `low_open`); with `size`, a number or one per element
    high: Any = None  # inclusive upper bound
    low_open: bool = False
    choices: tuple[Any, ...] | None = None
    size: Any = None  # a sequence of this many values (int, or a function of the prior); one value stands for all
    nullable: bool = False  # None is accepted and means the behaviour `help` describes
    modes: tuple[Mode, ...] = MODES  # the public calls that take it
    conditional_only: bool = False  # an unconditional prior takes the default only

    def resolve(self, prior: Any, options: Mapping[str, Any] | None = None) -> Option:
        """This option with its prior-dependent bounds and default computed."""
        def value(v: Any) -> Any:
            return v(prior, options or {}) if callable(v) else v

        return replace(self, default=value(self.default), low=value(self.low), high=value(self.high),
                       size=value(self.size))

    def allowed(self) -> str:
        """What the option accepts, in words: 'an integer in 1..16', 'a number in (0, 1]', ..."""
        one, many = KIND_WORDS[self.type]
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = f"{one} or {self.size} {many}" if self.size else one
            text += self._range()
        return text + (" or None" if self.nullable else "")

    def _range(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            if self.size:  # bounds may differ per element
                return f" {'>' if self.low_open else '>='} {_text(lo)} and <= {_text(hi)}"
            if self.type is int:
                return f" in {_text(lo)}..{_text(hi)}"
            return f" in {'(' if self.low_open else '['}{_text(lo)}, {_text(hi)}]"
        if lo is not None:
            return f" {'>' if self.low_open else '>='} {_text(lo)}"
        if hi is not None:
            return f" <= {_text(hi)}"
        return ""

    def refuse(self, value: Any) -> ValueError:
        return ValueError(f"{self.name} must be {self.allowed()}, got {_text(value)}")

    def check(self, value: Any, conditional: bool = True) -> Any:
        """`value` normalised (float, int, str, or a tuple with `size`); a resolved option only."""
        if value is None and self.nullable:
            return None
        if self.size:
            items = list(value) if isinstance(value, (list, tuple)) else [value] * self.size
            if len(items) != self.size:
                raise self.refuse(value)
            out: Any = tuple(self._scalar(v, value) for v in items)
        else:
            out = self._scalar(value, value)
        self._check_bounds(out, value)
        if self.conditional_only and not conditional and out != self.default:
            raise ValueError(f"{self.name} must be {_text(self.default)} for an unconditional prior, "
                             f"got {_text(value)}")
        return out

    def _scalar(self, v: Any, whole: Any) -> Any:
        """One element converted to the option's type; `whole` is what the user gave, for the message."""
        if self.type is str:
            ok = isinstance(v, str)
        elif self.type is int:
            ok = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        else:
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (self.choices is not None and v not in self.choices):
            raise self.refuse(whole)
        return self.type(v)

    def _check_bounds(self, out: Any, value: Any) -> None:
        items = out if self.size else (out,)
        for i, v in enumerate(items):
            lo = self.low[i] if isinstance(self.low, (tuple, list)) else self.low
            hi = self.high[i] if isinstance(self.high, (tuple, list)) else self.high
            if lo is not None and (v <= lo if self.low_open else v < lo):
                raise self.refuse(value)
            if hi is not None and v > hi:
                raise self.refuse(value)


class SamplerOptions:
    """A prior's options, in the order they are checked (a bound may read the options before it)."""

    def __init__(self, *options: Option):
        names = [o.name for o in options]
        if len(set(names)) != len(names):
            raise ValueError(f"sampler options declared twice: {sorted({n for n in names if names.count(n) > 1})}")
        self.options = options

    def __iter__(self) -> Iterator[Option]:
        return iter(self.options)

    def __getitem__(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(name)

    def names(self, mode: Mode = "sample") -> list[str]:
        return [o.name for o in self.options if mode in o.modes]

    def resolve(self, prior: Any, mode: Mode = "sample") -> tuple[Option, ...]:
        """The options of `prior` for one call, with concrete bounds and defaults (for widgets and help)."""
        return tuple(o.resolve(prior) for o in self.options if mode in o.modes)

    def check(self, prior: Any, given: Mapping[str, Any], mode: Mode = "sample") -> dict[str, Any]:
        """The given options normalised; a ValueError names the first unknown or bad one."""
        names = self.names(mode)
        unknown = [k for k in given if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{type(prior).__name__}.{mode} has no option {unknown[0]!r}{hint}; "
                             f"valid options: {', '.join(names) or 'none'}")
        conditional = bool(getattr(getattr(prior, "conditioner", None), "is_conditional", True))
        out: dict[str, Any] = {}
        for option in self.options:
            if option.name in given:
                out[option.name] = option.resolve(prior, out).check(given[option.name], conditional)
        return out


def describe(options: tuple[Option, ...]) -> str:
    """One paragraph per option: name, what it accepts, its default and help (`--list-options`)."""
    lines = []
    for o in options:
        lines.append(f"{o.name}: {o.allowed()}; default {_text(o.default)}")
        lines.append(f"    {o.help}")
    return "\n".join(lines) if lines else "(no sampler options)"

