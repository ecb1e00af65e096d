"""Share patches on the Hugging Face Hub: download (verified), push with a model card, export for other tools.

Example:
    >>> from forgetpatch.hub import download, push, export_kohya
    >>> url = push("no-vangogh/", "org/no-vangogh")         # files + generated README.md, one commit
    >>> folder = download("org/no-vangogh", revision="v1")  # Hub cache; every file sha256-checked
    >>> export_kohya(folder, "no-vangogh.safetensors")      # one file for AUTOMATIC1111 / ComfyUI
"""

from __future__ import annotations

from forgetpatch.hub.card import (
    parent_names,
    readable,
    render_card,
    robustness_summary,
    short_value,
    summary_rows,
)
from forgetpatch.hub.download import HUB_ID, download, is_hub_id, split_ref, why_local
from forgetpatch.hub.kohya import export_kohya, kohya_name
from forgetpatch.hub.push import push

__all__ = [
    "HUB_ID",
    "download",
    "export_kohya",
    "is_hub_id",
    "kohya_name",
    "parent_names",
    "push",
    "render_card",
    "readable",
    "robustness_summary",
    "short_value",
    "split_ref",
    "summary_rows",
    "why_local",
]
