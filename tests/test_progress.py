"""Long runs say early, once, how long they will take (forgetpatch.progress)."""

from __future__ import annotations

import io

import pytest

from forgetpatch import progress


def test_duration_reads_like_a_person_would_say_it():
    assert [progress.duration(s) for s in (4.4, 59, 200, 3600 + 5 * 60)] == [
        "4 s",
        "59 s",
        "3 min 20 s",
        "1 h 05 min",
    ]


def test_the_estimate_is_printed_once_from_the_steps_after_the_first(monkeypatch):
    clock = iter([10.0, 13.0])  # read at the end of step 1 (its warm-up is not counted) and of step 3
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    monkeypatch.setattr(progress.EstimatingBar, "write", classmethod(lambda cls, s, **_: out.write(s + "\n")))
    b = progress.bar(total=200, desc="fine-tune")
    for _ in range(6):
        b.update(1)
    b.close()
    lines = out.getvalue().splitlines()
    assert lines == ["fine-tune: about 5 min 00 s for 200 steps (1.5 s each, measured on this machine)"]
    assert b.estimate_s == pytest.approx(300.0)


def test_short_runs_and_disabled_bars_print_nothing(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(progress.EstimatingBar, "write", classmethod(lambda cls, s, **_: out.write(s)))
    for disable in (False, True):
        b = progress.bar(total=5, desc="quick", disable=disable)
        for _ in range(5):
            b.update(1)
        b.close()
    assert out.getvalue() == ""


def test_a_loss_shown_beside_a_bar_does_not_redraw_it_every_step():
    """A bar redraws at most every ``mininterval``; ``set_postfix`` redraws at once unless told not to (a log of
    a minutes-long run got a frame per step). Every postfix in the package leaves the redraw to the bar."""
    import ast
    from pathlib import Path

    from tqdm import tqdm

    def frames(refresh: bool) -> int:
        out = io.StringIO()
        with tqdm(total=50, file=out, mininterval=3600, miniters=1) as b:
            for i in range(50):
                b.update(1)
                b.set_postfix(loss=f"{i:.3f}", refresh=refresh)
        return out.getvalue().count("\r")

    assert frames(refresh=False) <= 3 < 50 <= frames(refresh=True)
    package = Path(progress.__file__).parent
    forced = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "set_postfix":
                refresh = next((k.value for k in node.keywords if k.arg == "refresh"), None)
                if not (isinstance(refresh, ast.Constant) and refresh.value is False):
                    forced.append(f"{path.relative_to(package)}:{node.lineno}")
    assert forced == [], f"set_postfix without refresh=False redraws every step: {forced}"
