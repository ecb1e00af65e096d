"""Progress bars for long runs that say, once and early, how long the whole run will take.

A fine-tuning erase (ESD, KSCU, Dynamic Mask) or a key-step analysis runs for minutes on a CPU. The bar
prints one line as soon as a few steps are timed (the first step is left out: it pays for warm-up), e.g.::

    fine-tune: about 3 min 20 s for 200 steps (1.0 s each, measured on steps 2-3)

Example:
    >>> from forgetpatch.progress import bar
    >>> with bar(total=4, desc="work", disable=True) as b:
    ...     for _ in range(4):
    ...         b.update(1)
"""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

#: Steps timed (after the first) before the estimate is printed.
TIMED_STEPS = 2
#: Runs estimated to take less than this many seconds print no estimate.
QUIET_BELOW_S = 20.0


def duration(seconds: float) -> str:
    """``seconds`` for a person: ``"45 s"``, ``"3 min 20 s"``, ``"1 h 05 min"``.

    Example:
        >>> duration(200)
        '3 min 20 s'
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class EstimatingBar(tqdm):  # type: ignore[type-arg]
    """A tqdm bar that prints the whole run's expected duration once, after the first timed steps."""

    def __init__(self, *args: Any, unit_name: str = "steps", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unit_name = unit_name
        self._updates = 0
        self._started: float | None = None
        self._first_done = 0.0
        self.estimate_s: float | None = None

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if self.disable:
            return shown
        self._updates += 1
        done = float(self.n - self.initial)
        if self._updates == 1:  # the first step pays for warm-up: time from its end
            self._started, self._first_done = time.perf_counter(), done
        elif self.estimate_s is None and self._updates == 1 + TIMED_STEPS and self.total:
            assert self._started is not None
            per = (time.perf_counter() - self._started) / max(done - self._first_done, 1e-9)
            self.estimate_s = per * (self.total - self.initial)
            if self.estimate_s >= QUIET_BELOW_S:
                self.write(
                    f"{self.desc}: about {duration(self.estimate_s)} for {self.total - self.initial:g} "
                    f"{self.unit_name} ({per:.2g} s each, measured on this machine)"
                )
        return shown


def bar(
    *, total: int, desc: str, disable: bool = False, unit_name: str = "steps", initial: int = 0
) -> EstimatingBar:
    """A progress bar over ``total`` steps that prints the run's expected duration once, early."""
    return EstimatingBar(total=total, desc=desc, disable=disable, unit_name=unit_name, initial=initial)
