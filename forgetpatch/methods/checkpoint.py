"""Checkpoints of the fine-tuning engine (:mod:`forgetpatch.methods.finetune`): where the file lives, its atomic
write, the settings check and reading it back.

Pure functions over plain data: the engine gathers its training state into a dict (``iteration``, ``trainable``,
``optimizer``, ``caches``, ``losses``, ``passes``, ``config``) and puts a loaded one back; nothing here knows the
engine. ``config`` holds the run's settings (:func:`settings`); a checkpoint written with other settings is refused.

Example:
    >>> path = save("runs/esd", {"iteration": 4, "config": settings(asdict(cfg)), ...})
    >>> state = load("runs/esd", settings(asdict(cfg)))    # None when there is no checkpoint yet
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from forgetpatch.errors import MethodError

#: The checkpoint's file name in its folder.
NAME = "engine_state.pt"
#: Settings that may differ between a run and its resumption (they do not change the result).
IGNORED = ("progress", "checkpoint_dir")


def path(folder: str | Path) -> Path:
    """The checkpoint file in ``folder``."""
    return Path(folder) / NAME


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint records and a resumed run must match: ``config`` (a run's settings as a dict, e.g.
    ``dataclasses.asdict(FinetuneConfig(...))``) without :data:`IGNORED`."""
    return {k: v for k, v in config.items() if k not in IGNORED}


def save(folder: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``folder`` atomically (a temporary file, then a rename: the old or the new checkpoint is
    whole after any failure); returns the file's path."""
    target = path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{NAME}.{uuid.uuid4().hex[:8]}.tmp")  # one per writer: two runs in one folder never
    try:  # rename each other's half-written file into place
        torch.save(dict(state), tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load(folder: str | Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The state saved in ``folder`` (tensors on the CPU), or ``None`` when there is none.

    Raises :class:`~forgetpatch.errors.MethodError`, naming the settings that differ, when it was written with other
    ``settings`` than these (see :func:`settings`). ``caches`` is always a ``{sample: cache}`` dict (a checkpoint
    written before batches held one ``cache``: sample 0's).
    """
    source = path(folder)
    if not source.exists():
        return None
    state = torch.load(source, map_location="cpu", weights_only=False)
    if state["config"] != dict(settings):
        diff = sorted(k for k in settings if state["config"].get(k) != settings[k])
        if "run" in diff:
            raise MethodError(
                f"checkpoint {source} was written by another erasure (other concepts, method settings or patches on "
                "the pipeline): give this one its own checkpoint_dir"
            )
        raise MethodError(
            f"checkpoint {source} was written with other settings ({', '.join(diff)}); "
            "use another checkpoint_dir or the same settings"
        )
    state["caches"] = state.get("caches", {0: state.get("cache")})
    return state


__all__ = ["IGNORED", "NAME", "load", "path", "save", "settings"]
