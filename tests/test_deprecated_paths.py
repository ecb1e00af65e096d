"""``methods/common.py`` is now ``methods/closed_form.py`` and ``methods/engine.py`` is ``methods/finetune.py``; the old
paths stay for one release as aliases that warn and give the same objects, and the package never imports them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests.test_layers import _imports

RENAMED = {"forgetpatch.methods.common": "forgetpatch.methods.closed_form",
           "forgetpatch.methods.engine": "forgetpatch.methods.finetune"}


@pytest.mark.parametrize("old, new", RENAMED.items())
def test_the_old_path_warns_and_gives_the_same_objects(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # a fresh import, so that it warns again
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*import {new} instead"):
        alias = importlib.import_module(old)
    module = importlib.import_module(new)
    assert module.__all__ and alias.__all__ == module.__all__
    for name in module.__all__:
        assert getattr(alias, name) is getattr(module, name), name
    for private in [n for n in vars(module) if n.startswith("_") and not n.startswith("__")]:
        assert getattr(alias, private) is getattr(module, private), private  # names the star import leaves out
    with pytest.raises(AttributeError):
        alias.no_such_name  # noqa: B018


def test_the_package_never_imports_the_old_paths():
    assert not [(module, target) for module, target in _imports() if target in RENAMED]
    code = "import forgetpatch, forgetpatch.methods, forgetpatch.cli, forgetpatch.eval, forgetpatch.attacks"
    run = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
