"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # Under `pytest -n N` every worker gets its share of the cores: torch's default (every core) in each worker makes
    # the workers' OpenMP threads contend, which is slower than one worker. Subprocesses the tests start inherit it.
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n N --dist loadgroup`` (the README's test command), the longest tests first: each worker takes
    the next test when it is nearly done, so the few that take minutes start at once on different workers instead of
    meeting at the end on one. ``@pytest.mark.slow(seconds=...)`` says how long (30 without a figure). Run without
    workers, the order is pytest's."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return 0 if mark is None else mark.kwargs.get("seconds", 30)

    items.sort(key=seconds, reverse=True)  # stable: the rest keep pytest's order




@pytest.fixture(scope="session", autouse=True)
def _workers_share_base_figures(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under ``pytest -n N``, the base model's figures are made once for all workers (``toy_bars.made_once``), in
    the folder above each worker's temporary folder: the run's own, which pytest clears with old runs."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import toy_bars

        toy_bars.SHARED = tmp_path_factory.getbasetemp().parent


@pytest.fixture(scope="session")
def toy_base_fidelity() -> dict[str, float]:
    """Held-out fidelity of the shipped toy pipeline (64 prompts), measured once per test run."""
    from toy_bars import base_fidelity  # here: conftest sets the threads before numpy is imported

    return base_fidelity()


@pytest.fixture
def competent_toy() -> dict[str, float]:
    """Use in toy-world tests that need a base drawing shapes: xfails (with the measured fidelity) if it cannot.
    The bar tests check it themselves, after training (``toy_bars.measure_recipe``)."""
    from toy_bars import require_competent_toy

    return require_competent_toy()
