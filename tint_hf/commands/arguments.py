"""Argument types shared by the ``tint-hf`` subcommands: each says what is allowed when a value is not.

    parser.add_argument("--lr", type=learning_rate)                  # finite and > 0
    parser.add_argument("--lrs", type=comma_list(learning_rate))      # 1e-5,1e-4
    parser.add_argument("--seeds", type=comma_list(int, unique=True)) # 1,2,3 (no repeats)
    parser.add_argument("--batch-size", type=at_least(1))
"""

from __future__ import annotations

import argparse
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


class Distinct(argparse.Action):
    """For ``nargs="+"`` options: refuse repeated values (``--seeds 0 0`` would average two copies of one run)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) != len(values):
            parser.error(f"{option_string} {' '.join(map(str, values))}: a value is repeated; each one is a "
                         "separate run.")
        setattr(namespace, self.dest, values)


__all__ = ["at_least", "comma_list", "finite_float", "fraction", "learning_rate", "learning_rate_or_zero",
           "non_negative", "positive", "Distinct"]
