"""Share patches on the Hugging Face Hub: download (verified), push with a model card, export for other tools.

Example:
    >>> from forgetpatch.hub import download, push, export_kohya
    >>> url = push("no-vangogh/", "org/no-vangogh")         # files + generated README.md, one commit
    >>> folder = download("org/no-vangogh", revision="v1")  # Hub cache; every file sha256-checked
    >>> export_kohya(folder, "no-vangogh.safetensors")      # one file for AUTOMATIC1111 / ComfyUI
"""

from __future__ import annotations

from forgetpatch.hub.card import render_card
from forgetpatch.hub.download import download, split_ref
from forgetpatch.hub.kohya import export_kohya, kohya_name
from forgetpatch.hub.push import push

__all__ = ["download", "export_kohya", "kohya_name", "push", "render_card", "split_ref"]
