"""Argument types shared by the ``tint-hf`` subcommands: each says what is allowed when a value is not.

    parser.add_argument("--lr", type=learning_rate)                  # finite and > 0
    parser.add_argument("--lrs", type=comma_list(learning_rate))      # 1e-5,1e-4
    parser.add_argument("--seeds", type=comma_list(int, unique=True)) # 1,2,3 (no repeats)
    parser.add_argument("--batch-size", type=at_least(1))
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from collections.abc import Callable


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def bounded_below(low: float, inclusive: bool, what: str) -> Callable[[str], float]:
    """A finite number > ``low`` (>= with ``inclusive``); ``what`` names it in the message."""
    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text!r}: {what} must be {'>=' if inclusive else '>'} {low:g}")
        return value
    parse.__name__ = what
    return parse


# a step size (a negative one would ascend the loss); 0 only where it is a grid's no-step control
learning_rate = bounded_below(0, False, "a learning rate (a negative one ascends the loss)")
learning_rate_or_zero = bounded_below(0, True, "a learning rate (0: no step; a negative one ascends the loss)")
non_negative = bounded_below(0, True, "this value")
positive = bounded_below(0, False, "this value")


def at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must lie strictly between 0 and 1")
    return value


def comma_list(item: Callable[[str], object], unique: bool = False) -> Callable[[str], tuple]:
    """A comma-separated, non-empty list of ``item`` values (``unique``: no value twice)."""
    def parse(text: str) -> tuple:
        values = tuple(item(x.strip()) for x in text.split(",") if x.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one value")
        if unique and len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: a value is repeated (each one is a separate run)")
        return values
    return parse


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names: ``SST2,MR`` -> ("SST2", "MR")."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def choices(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """A non-empty comma-separated subset of ``allowed``."""
    def parse(text: str) -> tuple[str, ...]:
        values = names(text)
        bad = [n for n in values if n not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated subset of {', '.join(allowed)}")
        return values
    return parse


def field_default(cls: type, name: str):
    """The default of dataclass field ``name`` of ``cls`` (a config or settings class): where a command's option
    takes its default, so that it is declared once."""
    (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def shown(value) -> str:
    """A default as a user types it: tuples and lists comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows every option's default (read from the parser, where it is declared), unless the help text
    already says what the default is or there is none (None, False, a required option)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and self._default_text(action):
            action = copy.copy(action)  # an option without help text still shows its default
            action.help = self._default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not self._default_text(action):
            return text
        return f"{text} {self._default_text(action)}"

    @staticmethod
    def _default_text(action: argparse.Action) -> str:
        """"(default: ...)" for a default worth showing, "" for none (None, False, suppressed, a required option)."""
        default = action.default
        if action.required or default is None or default is False or default == argparse.SUPPRESS:
            return ""
        return f"(default: {shown(default).replace('%', '%%')})"


class Distinct(argparse.Action):
    """For ``nargs="+"`` options: refuse repeated values (``--seeds 0 0`` would average two copies of one run)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) != len(values):
            parser.error(f"{option_string} {' '.join(map(str, values))}: a value is repeated; each one is a "
                         "separate run.")
        setattr(namespace, self.dest, values)


__all__ = ["DefaultsFormatter", "Distinct", "at_least", "choices", "comma_list", "field_default", "finite_float", "fraction",
           "learning_rate", "learning_rate_or_zero", "names", "non_negative", "positive", "shown"]
