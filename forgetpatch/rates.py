"""Rates with their 95% intervals, and how they are written: the one place every figure's interval comes from.

**A rate** is ``k`` of ``n`` images; its interval is Wilson's score interval, ``(p + z^2/2n +- z sqrt(p(1-p)/n +
z^2/4n^2)) / (1 + z^2/n)`` with ``z = 1.96``, which stays inside ``[0, 1]`` and is not degenerate at ``k = 0`` or
``k = n``.

**A ratio of two rates measured on the same images** (a patched model's retention over its base's, same prompts and
seeds) is a ratio of paired proportions. With ``f11`` images right on both, ``f10`` on the model only and ``f01`` on
the base only, ``R = (f11 + f10) / (f11 + f01)``. Its true value is at least the share of what the base gets right
that the model gets right too, ``P11 / (P11 + P01)``, and at most the inverse of the share of what the model gets
right that the base gets right too; :func:`paired_ratio_interval` takes the Wilson bound of each (a lower bound of
``f11`` of ``f11 + f01``, one over the lower bound of ``f11`` of ``f11 + f10``). Each end misses no more often than
its Wilson bound does (about its nominal 2.5%; Wilson's is not exact), so the interval is conservative next to it: its
lower end is the share itself when the model only loses images the base had, lower when it also gains some. (A delta-method interval on the log ratio, tried first, let the
true ratio fall under its lower bound on up to 4.4% of simulated draws where a 95% interval allows 2.5%.) Where only
the two rates are known (:func:`ratio_interval`, e.g. a report read back from an older file), the interval is the
one's lower end over the other's upper end and the reverse, which leaves out what the pairing tells.

**Written** (:func:`rate_text`), a rate never claims more than was measured: bounds are rounded outward (the lower
down, the upper up), and a point is shown as 100% or 0% only when every or no image counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: z of the two-sided 95% interval.
Z95 = 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (95% by default), rounded outward to 4 decimals.

    Example:
        >>> wilson(16, 16)   # all 16 images forgotten: the rate is at least 0.80
        (0.8063, 1.0)
        >>> wilson(0, 0)     # nothing measured: anything
        (0.0, 1.0)
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (_down(max(0.0, centre - half)), _up(min(1.0, centre + half)))


def paired_ratio_interval(model: Sequence[bool], base: Sequence[bool], z: float = Z95) -> tuple[float, float] | None:
    """95% interval of ``mean(model) / mean(base)``, the two measured on the same images (``model[i]`` and
    ``base[i]`` are one image's outcome on each): from the Wilson bounds of the shares each model keeps of what the
    other gets right (module docstring). ``None`` when the lengths differ, nothing is measured, or no image is right
    on both (no upper end).

    Example:
        >>> paired_ratio_interval([True] * 16, [True] * 16)   # both right on all 16: the ratio is at least 0.80
        (0.8063, 1.2403)
        >>> paired_ratio_interval([True] * 60 + [False] * 40, [True] * 100)   # the model keeps 60 of 100
        (0.502, 1.0641)
    """
    if len(model) != len(base) or not model:
        return None
    f11 = sum(1 for m, b in zip(model, base, strict=True) if m and b)
    f10 = sum(1 for m, b in zip(model, base, strict=True) if m and not b)
    f01 = sum(1 for m, b in zip(model, base, strict=True) if b and not m)
    if f11 == 0:
        return None
    kept_of_base, kept_of_model = wilson(f11, f11 + f01, z)[0], wilson(f11, f11 + f10, z)[0]
    return (kept_of_base, _up(1 / kept_of_model))


def ratio_interval(interval: Sequence[float], base_interval: Sequence[float]) -> tuple[float, float] | None:
    """A conservative interval of a ratio of two rates known only by their intervals: the lower end of one over the
    upper end of the other, and the reverse (``None`` where the base's lower end is 0: no upper end).

    Example:
        >>> ratio_interval(wilson(16, 16), wilson(16, 16))
        (0.8063, 1.2403)
    """
    lo, hi = interval
    base_lo, base_hi = base_interval
    if base_lo <= 0:
        return None
    return (_down(lo / base_hi), _up(hi / base_lo))


def rate_text(value: float | None, interval: Sequence[float] | None = None, n: int | None = None) -> str:
    """``"94% [85-98%], n=48"``; ``"-"`` when not measured. Never more than measured: bounds rounded outward, and
    100% or 0% only for every or no image.

    Example:
        >>> rate_text(199 / 200, wilson(199, 200), 200)
        '>99% [97-100%], n=200'
        >>> rate_text(1.0, wilson(34, 34), 34)
        '100% [89-100%], n=34'
    """
    if value is None:
        return "-"
    text = percent(value)
    if interval is not None and interval[0] is not None:
        text += f" {interval_text(interval)}"
    return text + (f", n={n}" if n is not None else "")


def interval_text(interval: Sequence[float]) -> str:
    """``"[85-98%]"``, the bounds rounded outward to whole percentages.

    Example:
        >>> interval_text(wilson(34, 34))
        '[89-100%]'
    """
    return f"[{math.floor(interval[0] * 100 + 1e-9):.0f}-{math.ceil(interval[1] * 100 - 1e-9):.0f}%]"


def percent(value: float | None, *, down: bool = False) -> str:
    """A share as a whole percentage, ``">99%"`` / ``"<1%"`` rather than a 100% or 0% it is not; ``down=True`` for a
    lower bound (rounded down, never up to a bar it misses).

    Example:
        >>> percent(0.996), percent(1.0), percent(0.005), percent(0.5), percent(0.845, down=True)
        ('>99%', '100%', '<1%', '50%', '84%')
    """
    if value is None:
        return "-"
    if down:
        return f"{math.floor(value * 100 + 1e-9):.0f}%"
    text = f"{value:.0%}"
    if value > 0 and text == "0%":
        return "<1%"
    if value < 1 and text == "100%":
        return ">99%"
    return text


def _down(x: float) -> float:
    return math.floor(x * 1e4 + 1e-9) / 1e4


def _up(x: float) -> float:
    return math.ceil(x * 1e4 - 1e-9) / 1e4
