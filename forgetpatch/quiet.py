"""Quiet third-party chatter while a pipeline loads (loading bars, notices such as the image processor's
torchvision fallback); errors still show."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No loading bars and no third-party notices (e.g. the image processor's torchvision fallback) while a
    pipeline loads; errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    loggers = (diffusers_logging, transformers_logging)
    levels = [lib.get_verbosity() for lib in loggers]
    bars = [lib.is_progress_bar_enabled() for lib in loggers]
    hub_level = hub_logging.get_verbosity()  # offline, it warns "Could not reach the Hub" on every load by id
    try:
        for lib in loggers:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        hub_logging.set_verbosity_error()
        yield
    finally:
        for lib, level, bar in zip(loggers, levels, bars, strict=True):
            lib.set_verbosity(level)
            if bar:
                lib.enable_progress_bar()
        hub_logging.set_verbosity(hub_level)


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """No huggingface_hub warnings (each of its five retries of an unreachable Hub logs two lines); its errors
    still raise, and forgetpatch names them (:mod:`forgetpatch.hub`)."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)
