"""What a method can do is said by its class flags (``closed_form``, ``denoisers``, ``key_steps``), and the callers
that used to keep lists of method names ask the registered class instead."""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

import pytest
from typer.testing import CliRunner

import forgetpatch
from forgetpatch.cli import app
from forgetpatch.errors import MethodError
from forgetpatch.methods import Concept, get_method, register, registered
from forgetpatch.methods.base import _REGISTRY, FLAGS
from forgetpatch.methods.defaults import with_defaults
from forgetpatch.testing import tiny_sd3_pipeline, tiny_sd_pipeline


def test_the_shipped_methods_flags_say_what_the_lists_said():
    # Before the flags: methods/defaults.py and benchmarks/closed_form.py (closed form: uce, scapre),
    # methods/closed_form.py's require_unet message (on SD3 and FLUX: uce, esd, kscu), benchmarks/finetune.py (key steps: kscu).
    assert [m.name for m in registered()] == ["uce", "scapre", "esd", "kscu", "dynamic_mask"]
    assert [m.name for m in registered() if m.closed_form] == ["uce", "scapre"]
    assert [m.name for m in registered() if "transformer" in m.denoisers] == [
        "uce", "scapre", "esd", "kscu", "dynamic_mask"
    ]
    assert all("unet" in m.denoisers for m in registered())
    assert [m.name for m in registered() if m.key_steps] == ["kscu"]
    for method in registered():
        assert {flag: type(getattr(method, flag)) for flag in FLAGS} == {
            "closed_form": bool, "denoisers": frozenset, "key_steps": bool, "params": tuple
        }, method.name


@pytest.fixture
def flagged():
    """Register a throwaway method class (made by the test) and take it off the registry afterwards."""
    names = []

    def make(**flags):
        received = {}

        class Flagged:
            name: ClassVar[str] = "flagged"
            version: ClassVar[str] = "1"

            def erase(self, pipe, concepts, *, preserve, **params):
                received.update(params, concepts=concepts)
                kept = {k: v for k, v in params.items() if k in ("name", "tokens", "templates")}
                return get_method("uce").erase(pipe, concepts, preserve=preserve, progress=False, **kept)

        for flag, value in flags.items():
            setattr(Flagged, flag, value)
        names.append(register(Flagged).name)
        return Flagged, received

    yield make
    for name in names:
        _REGISTRY.pop(name, None)


def test_a_class_that_leaves_flags_out_gets_the_defaults(flagged):
    cls, _ = flagged()
    assert (cls.closed_form, cls.denoisers, cls.key_steps) == (False, frozenset({"unet"}), False)
    assert get_method("flagged").denoisers == FLAGS["denoisers"]


@pytest.mark.parametrize(
    "flags, message",
    [({"closed_form": "yes"}, "closed_form must be True or False"),
     ({"key_steps": 1}, "key_steps must be True or False"),
     ({"denoisers": {"unet"}}, "denoisers must be a non-empty frozenset"),
     ({"denoisers": frozenset({"mmdit"})}, "denoisers must be a non-empty frozenset")],
)
def test_register_refuses_a_flag_of_the_wrong_type(flagged, flags, message):
    with pytest.raises(TypeError, match=message):
        flagged(**flags)
    assert "flagged" not in forgetpatch.methods.available_methods()


@pytest.mark.parametrize("closed_form", [True, False])
def test_closed_form_flag_decides_in_context_editing(flagged, closed_form):
    flagged(closed_form=closed_form)
    sd = tiny_sd_pipeline(seed=0)
    _, _, params = with_defaults(sd, "flagged", [Concept("cat")], [], {})
    assert ("templates" in params) is closed_form


@pytest.mark.parametrize("closed_form", [True, False])
def test_the_toy_worlds_settings_follow_the_flag_not_a_list_of_names(flagged, closed_form):
    """A new closed-form method on the toy world is edited in the world's prompt forms, steered and preserving the
    other shapes, like UCE and ScaPre; a new fine-tuning method gets none of that."""
    from forgetpatch.toy import erase_defaults
    from forgetpatch.toy.vocab import ERASE_TEMPLATES

    flagged(closed_form=closed_form)
    toy_like = SimpleNamespace(forgetpatch_defaults=erase_defaults)
    erased, kept, params = with_defaults(toy_like, "flagged", [Concept("circle")], [], {})
    assert (params.get("templates") == list(ERASE_TEMPLATES)) is closed_form
    assert (erased[0].guide == "cross" and "star" in [c.target for c in kept]) is closed_form


@pytest.mark.parametrize("closed_form", [True, False])
def test_the_cli_treats_a_method_as_its_flags_say(flagged, tmp_path, closed_form):
    _, received = flagged(closed_form=closed_form)
    folder = tmp_path / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    out = tmp_path / "patch"
    result = CliRunner().invoke(app, ["erase", "--base", str(folder), "--method", "flagged", "-c", "cat", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert ("templates" in received and received["tokens"] == "trailing") is closed_form
    assert "flagged" in result.output


def test_the_methods_that_run_on_a_transformer_are_named_from_their_flags(flagged):
    flagged(denoisers=frozenset({"unet", "transformer"}))
    from forgetpatch.methods.closed_form import require_unet

    pattern = "on SD3 and FLUX use method='uce', 'scapre', 'esd', 'kscu', 'dynamic_mask' or 'flagged'$"
    with pytest.raises(MethodError, match=pattern):
        require_unet(tiny_sd3_pipeline(0), "a UNet-only method")
