"""Putting patches on diffusers pipelines and taking them off again, exactly.

How a patch is applied:

* **unfused** (default): the factors are loaded as a named peft adapter (:mod:`forgetpatch.loader.adapters`:
  peft's LoRA layers on the patch's target layers, registered where diffusers keeps its adapters) and switched
  on beside whatever adapters the user has active (peft adds their deltas, in application order).
* **fused** (``fuse=True``): ``scale * (alpha / r) * B @ A`` is added into each targeted weight, the
  same arithmetic as peft's merge, after a copy of the original tensor is kept on the layer. The
  patch is not kept as a peft adapter: peft skips *every* adapter of a layer with a merged one,
  which would silently switch off unfused patches stacked on the same layers.
* **key-step gating** (``key_steps=True``): a forward pre-hook on the denoiser (the UNet, or the SD3 / FLUX
  transformer; "UNet" below) reads each call's timestep ``t``, computes the trajectory fraction ``1 - t / T``
  (flow matching: ``1 - sigma``; see :mod:`forgetpatch.loader.families`) and switches on exactly the patches
  whose ranges contain it (only when that set changes, so steady stretches cost nothing). ``T`` is the
  ``num_train_timesteps`` of the scheduler of the pipelines given to ``apply`` / ``remove`` / ``applied``,
  read at call time, so a scheduler swapped after ``apply`` is followed; if two live pipelines sharing
  the UNet disagree on it, the gate cannot tell which one runs and raises :class:`ApplyError`. Works for
  any scheduler, step count and classifier-free guidance, since it only looks at ``t``. Text-encoder
  parts of a patch are not gated (the text encoder runs once).

Removal deletes the adapters (unwrapping peft layers that carry no adapter any more) and copies the kept
originals back into fused weights, so parameters are bit-identical to before ``apply``; fused patches that stay
are added again from the originals with the arithmetic (dtype) of their first fusing, so that holds after a
``pipe.to(torch.float16)`` in between too. A fused ``apply`` that fails half-way is undone the same way.

Coexistence with the user's own LoRAs (loaded with diffusers' ``load_lora_weights``):

* A patch adds to what the user has active: each peft layer's active set becomes the user's set, as it
  was, plus forgetpatch's adapters. The user's adapter weights (peft scalings) are never written;
  the gate switches forgetpatch's adapters only. ``remove`` (and a failed ``apply``) puts the active
  sets back as they were and unwraps only the layers forgetpatch wrapped.
* A user's LoRA fused with ``fuse_lora()`` stays fused: peft unmerges every fused layer of a model it
  injects an adapter into, so the merges are hidden from it meanwhile and the weights never move.
  A patch whose targets include a layer with a fused LoRA is refused (:class:`ApplyError`): its base
  weights cannot be checked there, and peft would skip an unfused patch on it. A LoRA the user fuses
  *after* a fused patch is merged again on top when the patch comes off, as ``fuse_lora`` would have.
* A patch that is not live is never reported, nor run, as applied. Before every forward of a
  component carrying forgetpatch's adapters, in ``applied``, ``apply`` and ``remove``, the adapters are
  checked: when a user call left them out of the active set (a later ``load_lora_weights`` activates
  only the new adapter; ``set_adapters`` only the named ones) they are switched back on beside the
  user's choice, with a warning. What cannot be undone without overriding the user raises
  :class:`ApplyError`: LoRA switched off by ``disable_lora()``, a forgetpatch adapter merged by
  ``fuse_lora()`` (or a layer carrying one merged, so peft skips it), an adapter deleted by
  ``unload_lora_weights()`` / ``delete_adapters()`` (``remove`` then clears it), or a patched component
  replaced on the pipeline. For a safety patch, running silently without it is the worst outcome.
  A gated patch that a user call switched on outside its key steps (peft activates the remaining adapter
  when the active one is deleted; ``set_adapters`` may name it) is switched off again.
* ``lora_scale`` / ``cross_attention_kwargs={"scale": ...}`` at call time scale every adapter, the
  patches' included, for that call, as diffusers documents. A scale a user call leaves on a patch's adapter
  (``fuse_lora(lora_scale=...)`` scales every active adapter and ``unfuse_lora`` does not scale back;
  ``set_adapters`` weights) is put back to the scale it was applied with, with a warning: a patch is weakened
  with ``apply(..., scale=)``, where ``applied()`` reports it.
* ``pipe.fuse_qkv_projections()`` makes attention run on fused copies of ``to_q`` / ``to_k`` / ``to_v``, which
  an adapter does not reach: applying onto them is refused, an unfused patch under them raises
  :class:`ApplyError` as a switched-off one does, and no patch is taken off while the copies would keep its change.
* ``pipe.unet = torch.compile(pipe.unet)`` (before or after ``apply``): the compiled wrapper runs the same
  UNet, hooks included, so the patches on it are listed, gated and taken off as before.
* ``requires_grad`` of every parameter is left as it was by ``apply``, ``remove`` and the gate (peft makes each
  adapter it activates trainable); a patch's own adapter parameters are never trainable.

Threads: ``apply``, ``remove``, ``applied``, ``unpatched`` and the hooks' bookkeeping are serialized per
UNet (a lock kept with its state); adapters are loaded with ``low_cpu_mem_usage=False`` (peft's
low-memory path patches ``nn.Module`` process-wide, so models built meanwhile in other threads got
weights on ``meta``), and the library log levels quieted during loading are changed under one global
lock. Running a pipeline while another thread applies or removes patches on it is not supported.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from forgetpatch.errors import (
    AlreadyAppliedError,
    ApplyError,
    FingerprintMismatchError,
    ForgetPatchError,
    HubError,
    LineageError,
    MissingModuleError,
    NotAppliedError,
    PatchFormatError,
)
from forgetpatch.format import (
    COMPONENTS,
    ORIGINAL_WEIGHT_ATTR,
    KeyStepRange,
    Patch,
    adapter_name,
    denoiser_name,
    fingerprint,
    read_patch,
    require_verifiable,
    resolve_module,
)
from forgetpatch.loader import adapters
from forgetpatch.loader.families import (
    check_family,
    check_key_steps,
    check_loadable,
    denoiser,
    gating_refusal,
    noise_fraction,
    timestep_of,
    unwrap,
)

logger = logging.getLogger(__name__)

PatchRef = str | os.PathLike | Patch
#: dtypes whose float16-rounded samples reproduce a float32 model's fingerprint.
_FINGERPRINT_DTYPES = (torch.float32, torch.float16, torch.float64)


@dataclass
class AppliedPatch:
    """One patch on a pipeline, as listed by :func:`applied`."""

    name: str
    """The adapter name (the patch name, made unique and peft-safe)."""
    patch: Patch
    scale: float = 1.0
    fused: bool = False
    ranges: list[KeyStepRange] | None = None
    """Key-step ranges the patch is gated to, or ``None`` when it is always on."""
    fused_dtypes: dict[str, torch.dtype] = field(default_factory=dict, repr=False)
    """Fused: each weight's dtype when the patch was added to it, so that taking off another patch fuses this one
    again with the same arithmetic (a pipeline converted with ``.to(dtype)`` in between stays bit-exact)."""

    @property
    def digest(self) -> str:
        return self.patch.digest


@dataclass(eq=False)
class _State:
    unet: weakref.ref
    """The denoiser (UNet or transformer) this bookkeeping belongs to (a deep copy of it carries copies of the
    hooks: they stand aside)."""
    denoiser: str = "unet"
    """Its component name: ``"unet"`` or ``"transformer"`` (module paths of gated layers start with it)."""
    entries: list[AppliedPatch] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    pipes: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    """Pipelines given to apply / remove / applied with this UNet: their schedulers give ``T`` at call time."""
    num_train_timesteps: int = 1000
    """The last ``T`` read, used when none of those pipelines is alive any more."""
    active: tuple[str, ...] = ()
    """Unfused patches switched on in the UNet now (the gate changes it per step)."""
    layers: list[tuple[str, nn.Module, tuple[str, ...]]] = field(default_factory=list)
    """(module path, peft layer, forgetpatch adapters on it) of every layer carrying an unfused patch."""
    held: dict[str, set[str]] = field(default_factory=dict)
    """Component name -> the forgetpatch adapters in it (from ``layers``)."""
    components: dict[str, weakref.ref] = field(default_factory=dict)
    """The component modules the patches were put on, to notice one replaced on the pipeline."""
    attentions: list[tuple[str, str, nn.Module]] = field(default_factory=list)
    """(patch name, module path, attention module) of every query/key/value projection a patch changes, to notice
    ``pipe.fuse_qkv_projections()``, after which the attention runs on fused copies a patch does not reach."""
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)
    gate: threading.RLock = field(default_factory=threading.RLock)
    """Held by a thread from the gate's switch to the end of that UNet call, so that another thread running the same
    UNet (pipelines sharing it) cannot switch the adapters to its own step meanwhile."""


#: Per thread, the bookkeeping whose gate the thread holds for a UNet call now running (innermost last).
_GATED = threading.local()


# Bookkeeping lives with the UNet (adapters live there too), so pipelines built from the same
# components (e.g. an img2img pipeline made from a txt2img one's components) share it.
_STATES: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()
# A user's peft layer -> the adapters active on it that are not forgetpatch's, per component.
_UserSets = dict[str, dict[nn.Module, list[str]]]


def _unet(pipe) -> nn.Module:
    """The pipeline's denoiser: its UNet, or its SD3 / FLUX transformer (:class:`ApplyError` without one)."""
    return denoiser(pipe)[1]


#: On a denoiser that patches were applied to: their names, as the loader last left them. A deep copy of the pipeline
#: keeps the attribute, and the patches with it, but not the loader's bookkeeping, which is kept by module.
_PATCHES_ATTR = "_forgetpatch_patches"


def _refuse_a_copy(unet: nn.Module, name: str) -> None:
    """:class:`ApplyError` when ``unet`` (one the loader keeps no bookkeeping for) carries patches: it is a copy of a
    patched denoiser, whose patches act but could not be reported, gated or taken off."""
    if on := getattr(unet, _PATCHES_ATTR, ()):
        raise ApplyError(
            f"this pipeline's {name} carries the patches {', '.join(on)} but is a copy of the one they were applied "
            "to (a deep copy or an unpickled patched pipeline), so forgetpatch cannot report, gate or take them off: "
            "make the copy with forgetpatch.loader.unpatched(pipe) and apply the patches to it, or copy before applying"
        )


def _state(pipe) -> _State:
    name, unet = denoiser(pipe)
    with _STATES_LOCK:
        state = _STATES.get(unet)
        if state is None:
            _refuse_a_copy(unet, name)
            state = _STATES[unet] = _State(unet=weakref.ref(unet), denoiser=name)
    with state.lock:
        state.pipes.add(pipe)
    return state


def _existing_state(pipe) -> _State | None:
    name = denoiser_name(pipe)
    if name is None:
        return None
    unet = unwrap(getattr(pipe, name))
    with _STATES_LOCK:
        state = _STATES.get(unet)
    if state is None:
        _refuse_a_copy(unet, name)
    else:
        with state.lock:
            state.pipes.add(pipe)
    return state


# --- loading -------------------------------------------------------------------------------
def load(ref: PatchRef, *, allow_unverified: bool = False) -> Patch:
    """Load a patch from a local folder, a ``.safetensors`` file, or a Hub id ``org/name[@revision]``.

    A string that names no local file is fetched from the Hub only when it is shaped like a Hub id and not
    like a path (``./x``, ``/x``, ``a/b/c``, ``x.safetensors``, or ``patches/x`` where ``patches`` is a local
    folder); the errors say what was tried. ``allow_unverified`` reads patches that carry nothing to verify them
    by (see :func:`forgetpatch.format.read_patch`); they are refused otherwise.

    Example:
        >>> patch = forgetpatch.load("./no-vangogh")
        >>> patch = forgetpatch.load("org/no-vangogh@v1")
    """
    if isinstance(ref, Patch):
        return ref
    if not isinstance(ref, (str, os.PathLike)):
        raise TypeError(f"a patch reference is a path, a Hub id or a Patch, not {type(ref).__name__}")
    path = Path(ref).expanduser()
    if path.exists():
        return read_patch(path, allow_unverified=allow_unverified)
    from forgetpatch.hub import download, is_hub_id, split_ref, why_local

    text = os.fspath(ref)
    local = why_local(ref)
    if local:
        raise PatchFormatError(f"no patch at {text!r} (in {Path.cwd()}): nothing exists there ({local})")
    if not is_hub_id(text):
        raise PatchFormatError(
            f"no patch at {text!r}: not an existing folder or file, nor a Hub id like 'org/name'"
        )
    repo_id, revision = split_ref(text)
    try:
        folder = download(repo_id, revision=revision, allow_unverified=allow_unverified)
    except HubError as exc:
        at = f" (revision {revision!r})" if revision else ""
        raise HubError(
            f"no local folder or file {text!r} (in {Path.cwd()}), and the Hub repo {repo_id!r}{at} "
            f"could not be fetched: {exc}"
        ) from exc
    return read_patch(folder, allow_unverified=allow_unverified)


def _as_list(refs: PatchRef | Iterable[PatchRef]) -> list[PatchRef]:
    if isinstance(refs, (str, os.PathLike, Patch)):
        return [refs]
    return list(refs)


def _with_parents(patches: list[Patch], state: _State, allow_unverified: bool) -> list[Patch]:
    """Each local patch preceded by its lineage parents that are not applied yet, found by digest among the patch
    folders beside it (a chain written by ``forgetpatch chain``: ``chain/step-1 ... step-k``)."""
    present = {e.digest for e in state.entries}
    out: list[Patch] = []
    parents: set[str] = set()  # put on as a parent: the same patch named later in ``patches`` is not applied twice
    for patch in patches:
        wanted = [d for d in patch.manifest.lineage if d not in present and d not in {p.digest for p in out}]
        if wanted:
            source = Path(patch.source) if patch.source is not None else None
            if source is not None and source.is_file() and (source.parent / "forgetpatch.json").is_file():
                source = source.parent  # the weights file of a patch folder: look beside the folder
            folder = source.parent if source is not None else None
            found: dict[str, Patch] = {}
            unreadable: dict[str, PatchFormatError] = {}  # folders beside it that cannot be read: no parent, or bad
            if folder is not None and folder.is_dir():
                for sibling in sorted(folder.iterdir()):
                    hidden = sibling.name.startswith(".")  # e.g. the work folder of a save running or killed there
                    if sibling != source and not hidden and (sibling / "forgetpatch.json").is_file():
                        try:
                            candidate = read_patch(sibling, allow_unverified=allow_unverified)
                        except PatchFormatError as exc:
                            unreadable[sibling.name] = exc
                            continue
                        found[candidate.digest] = candidate
            missing = [d for d in wanted if d not in found]
            if missing:
                raise LineageError(
                    f"patch {patch.name!r} was computed on top of {len(wanted)} patches; {len(missing)} of them "
                    f"({', '.join(d[:12] for d in missing)}) are neither applied nor in a folder beside it"
                    + (f" ({folder})" if folder is not None else "")
                    + "".join(f"; {name} there could not be read ({exc})" for name, exc in unreadable.items())
                    + ": apply them first, in order"
                )
            out += [found[d] for d in wanted]
            parents.update(wanted)
        if patch.digest not in parents:
            out.append(patch)
    return out


# --- the user's adapters ------------------------------------------------------------------
def _ours(state: _State) -> set[str]:
    return {e.name for e in state.entries if not e.fused}


def _user_sets(layers: list[tuple[str, nn.Module]], ours: set[str]) -> _UserSets:
    out: _UserSets = {}
    for path, layer in layers:
        out.setdefault(path.partition(".")[0], {})[layer] = [
            n for n in layer.active_adapters if n not in ours
        ]
    return out


# --- checks (before anything is changed) ---------------------------------------------------
def check_scale(scale) -> float:
    """``scale`` as a float, or :class:`ApplyError` unless it is a finite number > 0 (checked before anything)."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ApplyError(
            f"scale must be a finite number > 0, not {scale!r}: 0 would switch the patch off and a "
            "negative scale would undo its forgetting"
        )
    return value


def _check(
    pipe,
    patches: Sequence[Patch],
    state: _State,
    layers: list[tuple[str, nn.Module]],
    *,
    strict: bool,
    fuse: bool,
    key_steps: bool,
    allow_unverified: bool,
) -> None:
    present = [e.digest for e in state.entries]
    targets = {path for patch in patches for path in patch.target_modules}
    disabled = [path for path, layer in layers if layer.disable_adapters and path in targets]  # only these matter
    if disabled and not fuse:
        raise ApplyError(
            f"LoRA is switched off on this pipeline (pipe.disable_lora(); e.g. {disabled[0]}), so an unfused "
            "patch would be off too: call pipe.enable_lora() first, or apply with fuse=True"
        )
    shared = _shared_with_another_unet(pipe, state, patches)
    if shared:
        raise ApplyError(
            f"this pipeline's {shared} is shared with a pipeline whose {state.denoiser} is another one, and patches "
            f"are on that {shared} there already: forgetpatch keeps a pipeline's patches with its {state.denoiser}, so "
            "the two would undo each other's. Apply to pipelines that share both, or give this one its own copy "
            f"(pipe.{shared} = copy.deepcopy(pipe.{shared}))."
        )
    for patch in patches:
        if patch.digest in present:
            raise AlreadyAppliedError(
                f"patch {patch.name!r} ({patch.digest[:12]}) is already applied; remove it first to re-apply"
            )
        if fuse and key_steps and patch.manifest.key_steps:
            raise ApplyError(
                f"patch {patch.name!r} has key-step ranges, which cannot be gated once fused; "
                "use fuse=False with key_steps=True"
            )
        check_family(pipe, patch)  # FamilyMismatchError: e.g. an SD 1.5 patch on SD3 / FLUX
        if key_steps:
            check_key_steps(pipe, patch)
        if not fuse:
            check_loadable(pipe, patch)
        for path in patch.target_modules:
            module = resolve_module(pipe, path)  # MissingModuleError
            if patch.delta_shape(path) != tuple(module.weight.shape):
                raise MissingModuleError(
                    f"patch {patch.name!r} changes {path} with shape {patch.delta_shape(path)}, but the "
                    f"pipeline's module has shape {tuple(module.weight.shape)}: it was made for "
                    + (_made_for(patch) if patch.manifest.base_model.id else "another architecture")
                )
            if module.weight.device.type == "meta":
                raise ApplyError(
                    f"patch {patch.name!r} changes {path}, whose weights are on the meta device "
                    "(pipe.enable_sequential_cpu_offload() keeps them in its hooks between calls), where they "
                    "cannot be checked or changed: apply patches before enabling sequential offload"
                )
            if adapters.bypassed(pipe, path):
                raise ApplyError(
                    f"patch {patch.name!r} changes {path}, but pipe.fuse_qkv_projections() is on: that attention "
                    "runs on fused copies of its projections, which a patch does not reach. Call "
                    "pipe.unfuse_qkv_projections() first; to fuse them with the patch in, apply it with fuse=True "
                    "and then call pipe.fuse_qkv_projections()."
                )
            wrapper = adapters.wrapper(pipe, path)
            if wrapper is not None and wrapper.merged_adapters:
                raise ApplyError(
                    f"patch {patch.name!r} changes {path}, where LoRA {', '.join(wrapper.merged_adapters)} is "
                    "fused into the weight (pipe.fuse_lora()): the base weights cannot be checked there, and "
                    "peft skips unfused adapters on a fused layer. Call pipe.unfuse_lora() first; to have your "
                    "LoRA fused as well, apply the patch with fuse=True and then fuse your LoRA again."
                )
        require_verifiable(patch, allow_unverified=allow_unverified)  # no or a partial fingerprint: refused
        expected = patch.manifest.base_model.fingerprint
        if expected:
            actual = fingerprint(pipe, expected)
            wrong = [p for p, fp in expected.items() if actual[p] != fp]
            if wrong:
                dtypes = {resolve_module(pipe, p).weight.dtype for p in wrong} - set(_FINGERPRINT_DTYPES)
                if dtypes:
                    dtype = str(sorted(dtypes, key=str)[0]).removeprefix("torch.")
                    raise FingerprintMismatchError(
                        f"patch {patch.name!r} cannot be checked against this pipeline's {dtype} weights: base "
                        f"fingerprints sample weights rounded to float16, which a {dtype} copy of the model "
                        "does not reproduce. Load the pipeline in float16 or float32 (dtype=torch.float16) "
                        "to apply it."
                    )
                raise FingerprintMismatchError(
                    f"patch {patch.name!r}: the base weights of {len(wrong)} of its {len(expected)} modules differ "
                    f"from this pipeline's (first: {wrong[0]}; a fine-tune, another checkpoint or revision, or a LoRA "
                    "fused into it). It was made for "
                    + (_made_for(patch) if patch.manifest.base_model.id else "another model: apply it to that one")
                )
        if strict:
            check_lineage([patch], present)
        present.append(patch.digest)


def check_lineage(patches: Sequence[Patch], applied: Sequence[str] = ()) -> None:
    """:class:`LineageError` when a patch's lineage parents are neither among the ``applied`` digests nor given
    before it in ``patches``; what ``apply(strict=True)`` checks, which the CLI checks before the model loads.

    Example:
        >>> check_lineage([forgetpatch.load("chain/step-1"), forgetpatch.load("chain/step-2")])
    """
    present = list(applied)
    for patch in patches:
        if missing := [d for d in patch.manifest.lineage if d not in present]:
            raise LineageError(
                f"patch {patch.name!r} was computed on top of patches that are not applied: "
                f"{', '.join(d[:12] for d in missing)}. Apply those first, in order (with_lineage=True finds "
                "them in the folders beside it; on the command line, give them before it or add --with-lineage), "
                "or pass strict=False"
            )
        present.append(patch.digest)


def _shared_with_another_unet(pipe, state: _State, patches: Sequence[Patch]) -> str | None:
    """The name of a component ``patches`` change that carries patches applied through another UNet's bookkeeping
    (pipelines built with the same text encoder and another UNet), or ``None``."""
    with _STATES_LOCK:
        others = [other for other in _STATES.values() if other is not state and other.entries]
    for component in sorted({path.partition(".")[0] for patch in patches for path in patch.target_modules}):
        module = unwrap(getattr(pipe, component, None))
        for other in others:
            ref = other.components.get(component)
            if ref is not None and ref() is module:
                return component
    return None


def _bypassed(state: _State, names: set[str]) -> list[tuple[str, str]]:
    """(patch name, module path) of the projections of patches ``names`` that their attention no longer runs on
    (``pipe.fuse_qkv_projections()``)."""
    return [(n, path) for n, path, attention in state.attentions if n in names and adapters.runs_fused(attention)]


def _made_for(patch: Patch) -> str:
    """``"org/model (revision abc123...); load that model (...)"``: the base a patch records, and how to load it."""
    base = patch.manifest.base_model
    if not base.revision:
        return f"{base.id}; load that model (CLI: --base {base.id})"
    return (
        f"{base.id} at revision {base.revision[:12]}; load that model (from_pretrained({base.id!r}, "
        f"revision={base.revision!r}); CLI: --base {base.id}@{base.revision})"
    )


def _gone(state: _State) -> dict[str, list[str]]:
    """Per component, forgetpatch's adapters that are no longer in its ``peft_config`` (a user's
    ``unload_lora_weights()`` or ``delete_adapters()``)."""
    out = {}
    for component, names in state.held.items():
        module = state.components[component]() if component in state.components else None
        config = getattr(module, "peft_config", None) or {}
        if gone := sorted(n for n in names if n not in config):
            out[component] = gone
    return out


def _verify(state: _State, pipes: Iterable, *, scales: bool = True) -> None:
    """Raise :class:`ApplyError` where an applied patch is not live and cannot be made so without overriding the
    user; switch back on (with a warning) forgetpatch adapters that a user call left out of the active set, put
    back (with a warning) the scale of one that a user call changed (``scales``: not inside a text encoder's call,
    which the pipeline scales by its ``lora_scale`` meanwhile), and switch off a gated one that a user call switched
    on outside its key steps (peft activates another adapter when one is deleted)."""
    for pipe in pipes:
        same = {c: unwrap(getattr(pipe, c, None)) is ref() for c, ref in state.components.items()}
        if unwrap(getattr(pipe, state.denoiser, None)) is not state.unet() and not any(same.values()):
            state.pipes.discard(pipe)  # given another UNet and holding no patched component: it has left (another
            continue  # pipeline still sharing the patched UNet runs on)
        replaced = [c for c, kept in same.items() if not kept]
        if replaced:
            raise ApplyError(
                f"pipe.{replaced[0]} was replaced after patches were applied to it: the patches "
                f"({', '.join(e.name for e in state.entries)}) are not on the new one. Call forgetpatch.remove(pipe) "
                "and apply them again."
            )
    if gone := _gone(state):
        component, names = next(iter(gone.items()))
        raise ApplyError(
            f"forgetpatch's adapter(s) {', '.join(names)} are no longer on the pipeline's {component} (deleted by "
            "unload_lora_weights() or delete_adapters()), so the patch is off, unless pipe.fuse_lora() merged it "
            "first: then it is baked into the weights, where it cannot be taken off exactly (load the pipeline "
            "again to be rid of it). Call forgetpatch.remove(pipe) to clear it, then apply it again."
        )
    bypassed = _bypassed(state, {e.name for e in state.entries if not e.fused})
    if bypassed:
        raise ApplyError(
            f"pipe.fuse_qkv_projections() was called after patch {bypassed[0][0]!r} was applied: the attention now "
            f"runs on fused copies of its projections (e.g. {bypassed[0][1]}), which the patch does not reach, so it "
            "is off. Call pipe.unfuse_qkv_projections(); to fuse them with a patch in, apply it with fuse=True first."
        )
    scale_of = {e.name: e.scale for e in state.entries}
    on, switched_on, rescaled = set(state.active), [], []
    for path, layer, names in state.layers:
        if layer.merged_adapters:
            raise ApplyError(
                f"pipe.fuse_lora() merged LoRA weights into {path}, which carries forgetpatch's adapter(s) "
                f"{', '.join(names)}: peft then skips its unmerged adapters, and a merged patch cannot be taken "
                "off exactly. Call pipe.unfuse_lora() (peft's unmerge leaves float rounding, about 1e-7, in those "
                "weights); to fuse your LoRA with patches on, apply them with fuse=True."
            )
        if layer.disable_adapters:
            raise ApplyError(
                f"LoRA is switched off (pipe.disable_lora()) on {path}, which carries forgetpatch's adapter(s) "
                f"{', '.join(names)}: the patch would be off too. Call pipe.enable_lora(), or forgetpatch.remove(pipe) "
                "to run without patches."
            )
        active, gated = layer.active_adapters, path.startswith(state.denoiser + ".")
        wanted = [n for n in names if n in on or not gated]
        missing = [n for n in wanted if n not in active]
        if missing or any(n in active and n not in wanted for n in names):
            adapters.activate(layer, [n for n in active if n not in names or n in wanted] + missing)
            switched_on += [n for n in missing if n not in switched_on]
        for n in names if scales else ():
            expected = scale_of[n] * layer.lora_alpha[n] / layer.r[n]
            if not math.isclose(layer.scaling[n], expected, rel_tol=1e-6):
                layer.set_scale(n, scale_of[n])
                rescaled += [n] if n not in rescaled else []
    if rescaled:
        warnings.warn(
            f"the scale of forgetpatch's adapter(s) {', '.join(rescaled)} had been changed by a call on the "
            "pipeline (fuse_lora(lora_scale=...) scales every active adapter, set_adapters(..., adapter_weights=...) "
            "the ones it names); it was put back to the scale they were applied with. To weaken a patch, remove "
            "it and apply it with scale=.",
            UserWarning,
            stacklevel=3,
        )
    if switched_on:
        warnings.warn(
            f"forgetpatch's adapter(s) {', '.join(switched_on)} had been left out of the active adapters (a later "
            "load_lora_weights() or set_adapters() activates only the adapters it names); they were switched "
            "back on beside yours. Name them in set_adapters(), or forgetpatch.remove() them, to avoid this.",
            UserWarning,
            stacklevel=3,
        )


# --- mutation ------------------------------------------------------------------------------
def _unique_name(pipe, state: _State, wanted: str) -> str:
    base = adapter_name(wanted)
    taken = adapters.adapter_names(pipe) | {e.name for e in state.entries}
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _add(patch: Patch, path: str, w: torch.Tensor, scale: float) -> torch.Tensor:
    """``w`` plus the patch's change at ``path``: in place in float32, else added in float32 and rounded once."""
    if w.dtype == torch.float32:
        patch.add_delta(path, w, scale=scale)
        return w
    return (w.float() + patch.delta(path).to(w.device) * scale).to(w.dtype)


@torch.no_grad()
def _fuse(pipe, patch: Patch, scale: float) -> dict[str, torch.dtype]:
    """Add the patch into its layers' weights (the original kept on each layer first); returns each weight's dtype
    (:attr:`AppliedPatch.fused_dtypes`). On failure the layers this call stashed are restored; a layer that already
    held a fused patch is the caller's to fuse again (:func:`_fuse_again`)."""
    stashed: list[nn.Module] = []
    dtypes: dict[str, torch.dtype] = {}
    try:
        for path in patch.target_modules:
            layer = resolve_module(pipe, path)
            w = layer.weight
            if getattr(layer, ORIGINAL_WEIGHT_ATTR, None) is None:
                setattr(layer, ORIGINAL_WEIGHT_ATTR, w.detach().clone())
                stashed.append(layer)
            dtypes[path] = w.dtype
            data = w.data  # a new tensor object on every access: keep one, to tell an in-place add from a new one
            added = _add(patch, path, data, scale)
            if added is not data:
                data.copy_(added)
    except BaseException:
        for layer in stashed:  # undo this patch's fresh stashes; older ones are restored by the caller
            layer.weight.copy_(getattr(layer, ORIGINAL_WEIGHT_ATTR))
            delattr(layer, ORIGINAL_WEIGHT_ATTR)
        raise
    return dtypes


@torch.no_grad()
def _restore_fused(pipe, entries: Iterable[AppliedPatch], skip: set[str] = frozenset()) -> None:
    for entry in entries:
        for path in set(entry.patch.target_modules) - skip:
            layer = resolve_module(pipe, path)
            original = getattr(layer, ORIGINAL_WEIGHT_ATTR, None)
            if original is not None:
                layer.weight.copy_(original)
                delattr(layer, ORIGINAL_WEIGHT_ATTR)


@torch.no_grad()
def _fuse_again(pipe, before: list[AppliedPatch], after: list[AppliedPatch]) -> None:
    """Make every weight fused by ``before`` what fusing ``after`` alone would have made it: from the kept original,
    each patch of ``after`` added again in order, in the dtype the weight had when it was first added (so a
    pipeline converted with ``.to(dtype)`` in between gets the same bits), then put into the weight as it is now.
    Layers ``after`` does not touch get their original back. A user's LoRA merged into one of those layers meanwhile
    (``fuse_lora()`` after ``apply``) is merged again on top, as ``fuse_lora`` would have."""
    wrappers = {adapters.wrapper(pipe, path) for e in before for path in e.patch.target_modules}
    merged = [(w, w.merged_adapters) for w in wrappers if w is not None and w.merged_adapters]
    for wrapper, _ in merged:
        wrapper.merged_adapters = []
    kept = {path for e in after for path in e.patch.target_modules}
    _restore_fused(pipe, [e for e in before if set(e.patch.target_modules) - kept], skip=kept)
    for path in kept:
        layer = resolve_module(pipe, path)
        layer.weight.copy_(_fused_weight(layer, path, after))
    for wrapper, names in merged:
        wrapper.merge(adapter_names=names)


def _fused_weight(layer: nn.Module, path: str, entries: Iterable[AppliedPatch]) -> torch.Tensor:
    """What fusing the fused patches of ``entries``, in order, into the layer's kept original makes of its weight:
    each added in the dtype the weight had when it was first added, as :func:`_fuse` did."""
    w = getattr(layer, ORIGINAL_WEIGHT_ATTR).clone()
    for e in entries:
        if path in e.patch.target_modules:
            w = _add(e.patch, path, w.to(e.fused_dtypes.get(path, w.dtype)), e.scale)
    return w


@torch.no_grad()
def _keep_changes_made_since(pipe, state: _State) -> None:
    """Before fused patches are added or taken off: a weight that is not what its fused patches made it was changed
    since, e.g. by a user's LoRA baked in with ``fuse_lora()`` then ``unload_lora_weights()``; that change becomes
    part of the kept original, so taking the patches off leaves it in (restoring the original wiped it). Layers with
    a LoRA merged and still loaded are left to :func:`_fuse_again`, which merges it again."""
    fused = [e for e in state.entries if e.fused]
    for path in {path for e in fused for path in e.patch.target_modules}:
        wrapper = adapters.wrapper(pipe, path)
        if wrapper is not None and wrapper.merged_adapters:
            continue
        layer = resolve_module(pipe, path)
        w, original = layer.weight, getattr(layer, ORIGINAL_WEIGHT_ATTR)
        expected = _fused_weight(layer, path, fused).to(device=w.device, dtype=w.dtype)
        if not torch.equal(w, expected):
            change = w.float() - expected.float()
            setattr(layer, ORIGINAL_WEIGHT_ATTR, (original.float() + change.to(original.device)).to(original.dtype))


def _is_active(entry: AppliedPatch, fraction: float) -> bool:
    return entry.ranges is None or any(r.start <= fraction <= r.end for r in entry.ranges)


def _switch(state: _State, names: tuple[str, ...]) -> None:
    """Switch the UNet's forgetpatch adapters to ``names``, leaving the user's active adapters as they are."""
    ours = _ours(state)
    for path, layer, _ in state.layers:
        if path.startswith(state.denoiser + "."):
            adapters.activate(layer, [n for n in layer.active_adapters if n not in ours] + list(names))
    state.active = names


def _train_steps(state: _State) -> int:
    seen = set()
    for pipe in list(state.pipes):
        config = getattr(getattr(pipe, "scheduler", None), "config", None)
        steps = getattr(config, "num_train_timesteps", None)
        if steps:
            seen.add(int(steps))
    if len(seen) > 1:
        raise ApplyError(
            f"pipelines sharing this UNet have schedulers with different num_train_timesteps ({sorted(seen)}): "
            "key-step gating cannot tell which one is running. Give them the same scheduler config, or "
            "forgetpatch.remove() the patches before building a pipeline with another one."
        )
    if seen:
        state.num_train_timesteps = seen.pop()
    return state.num_train_timesteps


def _check_gating(state: _State) -> None:
    """:class:`ApplyError` at a gated call when a pipeline of the UNet has a scheduler its patches' key steps cannot
    be read on (one set after ``apply``, e.g. an EDM scheduler): gating would switch at the wrong noise levels."""
    gated = [e for e in state.entries if not e.fused and e.ranges is not None]
    for pipe in list(state.pipes):
        if why := gating_refusal(pipe, {r.convention for e in gated for r in e.ranges}):
            raise ApplyError(
                f"patch {gated[0].name!r} is gated to its key steps, but {why}. Set the scheduler it was applied "
                "with back, or forgetpatch.remove() it and apply it without key_steps=True (always on)."
            )


def _unet_hook(state: _State):
    def hook(unet, args, kwargs):
        if unet is not state.unet():
            return None
        with state.lock:
            _verify(state, list(state.pipes))
            if not any(e.ranges is not None for e in state.entries if not e.fused):
                return None
            timestep = timestep_of(unet, state.denoiser, args, kwargs)
            if timestep is None:
                return None
            _check_gating(state)
        # The adapters are the UNet's, shared by every thread running it: hold the gate through this call (released
        # by _unet_done), so that a call at another step in another thread waits instead of switching them under it.
        held = getattr(_GATED, "states", [])
        if state in held:  # a call of this thread that never ended (torch runs no hook after a KeyboardInterrupt)
            for _ in range(held.count(state)):
                state.gate.release()
            _GATED.states = [s for s in held if s is not state]
        state.gate.acquire()
        try:
            with state.lock:
                unfused = [e for e in state.entries if not e.fused]
                fraction = noise_fraction(unet, timestep, _train_steps(state))
                names = tuple(e.name for e in unfused if _is_active(e, fraction))
                if names != state.active:
                    _switch(state, names)
        except BaseException:
            state.gate.release()
            raise
        _GATED.states = [*getattr(_GATED, "states", []), state]
        return None

    return hook


def _unet_done(state: _State):
    def hook(unet, args, output):  # always called, also when the forward raised
        held = getattr(_GATED, "states", [])
        if held and held[-1] is state:
            _GATED.states = held[:-1]
            state.gate.release()
        return None

    return hook


def _component_hook(state: _State, component: str):
    def hook(module, args):
        ref = state.components.get(component)
        if ref is None or module is not ref():
            return None
        with state.lock:
            _verify(state, list(state.pipes), scales=False)
        return None

    return hook


def _sync(pipe, state: _State, user: _UserSets) -> None:
    """Every peft layer's active set := the user's (``user``, taken before forgetpatch changed anything) + all
    unfused patches at their scales; then the bookkeeping of their layers and the hooks that guard them."""
    unfused = [e for e in state.entries if not e.fused]
    on = [e.name for e in unfused]
    if (unet := state.unet()) is not None:
        setattr(unet, _PATCHES_ATTR, tuple(e.name for e in state.entries))
    layers = adapters.tuner_layers(pipe)
    for path, layer in layers:
        known = user.get(path.partition(".")[0], {})
        adapters.activate(layer, known.get(layer, next(iter(known.values()), [])) + on)
        for e in unfused:
            if e.name in getattr(layer, "scaling", {}):
                layer.set_scale(e.name, e.scale)
    state.active = tuple(on)
    _rescan(pipe, state, layers)
    for handle in state.hooks:
        handle.remove()
    state.hooks = []
    if on:
        unet = _unet(pipe)
        state.hooks.append(unet.register_forward_pre_hook(_unet_hook(state), with_kwargs=True))
        state.hooks.append(unet.register_forward_hook(_unet_done(state), always_call=True))
    for component in sorted({path.partition(".")[0] for path, _, _ in state.layers} - {state.denoiser}):
        state.hooks.append(
            unwrap(getattr(pipe, component)).register_forward_pre_hook(_component_hook(state, component))
        )


def _rescan(pipe, state: _State, layers: list[tuple[str, nn.Module]]) -> None:
    ours = [e.name for e in state.entries if not e.fused]
    state.layers, state.held = [], {}
    for path, layer in layers:
        names = tuple(n for n in ours if n in getattr(layer, "lora_A", {}))
        if names:
            state.layers.append((path, layer, names))
            state.held.setdefault(path.partition(".")[0], set()).update(names)
    touched = {path.partition(".")[0] for e in state.entries for path in e.patch.target_modules}
    state.components = {
        c: weakref.ref(unwrap(getattr(pipe, c))) for c in sorted(touched) if getattr(pipe, c, None) is not None
    }
    state.attentions = [
        (e.name, path, owner) for e in state.entries for path in e.patch.target_modules
        if (owner := adapters.projection_owner(pipe, path)) is not None
    ]  # fmt: skip


def _take_off(pipe, state: _State, leaving: list[AppliedPatch], user: _UserSets | None = None) -> None:
    user = _user_sets(adapters.tuner_layers(pipe), _ours(state)) if user is None else user
    leaving_names = {e.name for e in leaving}
    remaining = [e for e in state.entries if e.name not in leaving_names]
    if any(e.fused for e in leaving):
        _fuse_again(pipe, [e for e in state.entries if e.fused], [e for e in remaining if e.fused])
    names = [e.name for e in leaving if not e.fused and e.name in adapters.adapter_names(pipe)]
    if names:
        adapters.delete_adapters(pipe, names)
    state.entries = remaining
    _sync(pipe, state, user)


# --- public API ----------------------------------------------------------------------------
def apply(
    pipe,
    refs: PatchRef | Iterable[PatchRef],
    *,
    scale: float = 1.0,
    fuse: bool = False,
    key_steps: bool = False,
    strict: bool = True,
    with_lineage: bool = False,
    allow_unverified: bool = False,
):
    """Apply one or several patches to ``pipe`` (in order, additively) and return ``pipe``.

    Args:
        refs: a ref or a list of refs: local folder, ``.safetensors`` file, Hub id, or :class:`Patch`.
        scale: multiplier of every patch's change (1.0 = as made); a finite number > 0.
        fuse: merge into the weights (zero inference overhead); still exactly removable.
        key_steps: gate each patch to its recorded key-step ranges (patches without ranges stay on).
        strict: refuse patches whose lineage parents are not applied.
        with_lineage: first apply a patch's lineage parents that are not on yet, in order, found among the patch
            folders beside it (``apply(pipe, "chain/step-5", with_lineage=True)`` puts steps 1-4 on first).
        allow_unverified: also read patches that carry nothing to verify them by (a format v0 file, a manifest
            without a base fingerprint for every module); a :class:`Patch` object is used as it was read.

    The user's own LoRAs stay as they are: patches add to their active adapters (see the module docstring).

    Raises :class:`~forgetpatch.errors.ApplyError` subclasses (bad scale, fingerprint mismatch, missing module,
    already applied, lineage, a fused LoRA on a targeted layer) or :class:`~forgetpatch.errors.PatchFormatError`;
    then the pipeline is exactly as it was, the user's adapters included.

    Example:
        >>> pipe = forgetpatch.apply(pipe, ["org/no-vangogh", "./no-church"], key_steps=True)
        >>> [p.name for p in forgetpatch.applied(pipe)]
        ['no-vangogh', 'no-church']
    """
    scale = check_scale(scale)
    flags = {"fuse": fuse, "key_steps": key_steps, "strict": strict, "with_lineage": with_lineage,
             "allow_unverified": allow_unverified}  # fmt: skip
    if wrong := {k: v for k, v in flags.items() if not isinstance(v, bool)}:
        name, value = next(iter(wrong.items()))
        raise ApplyError(
            f"{name} takes True or False, got {value!r}"
            + (": a patch is gated to the key-step ranges its manifest records" if name == "key_steps" else "")
        )
    patches = [load(ref, allow_unverified=allow_unverified) for ref in _as_list(refs)]
    state = _state(pipe)
    with state.lock:
        _verify(state, [pipe])
        if with_lineage:
            patches = _with_parents(patches, state, allow_unverified)
        layers = adapters.tuner_layers(pipe)
        _check(pipe, patches, state, layers, strict=strict, fuse=fuse, key_steps=key_steps,
               allow_unverified=allow_unverified)  # fmt: skip
        user = _user_sets(layers, _ours(state))
        _keep_changes_made_since(pipe, state)
        added: list[AppliedPatch] = []
        before = adapters.adapter_names(pipe)
        targets = [] if fuse else [path for patch in patches for path in patch.target_modules]
        with adapters.trainability_kept(adapters.reach(pipe, layers, targets)):
            _put_on(pipe, state, patches, added, user, before, scale=scale, fuse=fuse, key_steps=key_steps)
    return pipe


def _put_on(
    pipe,
    state: _State,
    patches: list[Patch],
    added: list[AppliedPatch],
    user: _UserSets,
    before: set[str],
    *,
    scale: float,
    fuse: bool,
    key_steps: bool,
) -> None:
    """:func:`apply`'s changes, after every check passed; on any failure the pipeline is put back as it was."""
    try:
        for patch in patches:
            entry = AppliedPatch(
                name=_unique_name(pipe, state, patch.name),
                patch=patch,
                scale=scale,
                fused=fuse,
                ranges=list(patch.manifest.key_steps) if key_steps and patch.manifest.key_steps else None,
            )
            if fuse:
                entry.fused_dtypes = _fuse(pipe, patch, scale)
            else:
                adapters.load_adapter(pipe, patch, entry.name)
            state.entries.append(entry)
            added.append(entry)
        _sync(pipe, state, user)
    except BaseException as exc:
        stray = sorted(adapters.adapter_names(pipe) - before - {e.name for e in added})  # loading failed half-way
        if stray:
            adapters.delete_adapters(pipe, stray)
        if fuse:  # a patch that failed half-way may have added to layers that held fused patches already
            fused = [e for e in state.entries if e.fused]
            _fuse_again(pipe, fused, fused)
        _take_off(pipe, state, added, user)
        if isinstance(exc, ForgetPatchError) or not isinstance(exc, Exception):
            raise
        raise ApplyError(f"applying patches failed and was undone: {exc}") from exc


def remove(pipe, names: str | Patch | Iterable[str | Patch] | None = None):
    """Take patches off ``pipe`` (all when ``names`` is None) and return ``pipe``.

    ``names`` are adapter names, patch names, digests or :class:`Patch` objects. Afterwards every
    parameter is bit-identical to what it was before those patches were applied, and the user's own
    adapters are active as they were.

    Example:
        >>> forgetpatch.remove(pipe, "no-vangogh")
        >>> forgetpatch.remove(pipe)                 # everything
    """
    state = _state(pipe)
    with state.lock:
        if names is None:
            leaving = list(state.entries)
        else:
            wanted = [names] if isinstance(names, (str, Patch)) else list(names)
            leaving = []
            for item in wanted:
                key = item.digest if isinstance(item, Patch) else item
                match = [e for e in state.entries if key in (e.name, e.patch.name, e.digest)]
                if not match:
                    on = ", ".join(e.name for e in state.entries) or "none"
                    raise NotAppliedError(f"no applied patch named {key!r} (applied: {on})")
                leaving.extend(m for m in match if m not in leaving)
        leaving_names = {e.name for e in leaving}
        bypassed = _bypassed(state, leaving_names)
        if bypassed:
            raise ApplyError(
                f"pipe.fuse_qkv_projections() is on: the attention runs on fused copies of its projections (e.g. "
                f"{bypassed[0][1]}), which taking a patch off would leave as they are. Call "
                "pipe.unfuse_qkv_projections() first (and fuse them again afterwards)."
            )
        gone = {n for names in _gone(state).values() for n in names}
        # merged and then unloaded (fuse_lora + unload_lora_weights): baked into the weights, no layer left to unmerge
        baked = sorted({n for _, layer, held in state.layers for n in held
                        if n in leaving_names and n in gone and n in layer.merged_adapters})  # fmt: skip
        for path, layer, held in state.layers:
            merged = [n for n in held if n in leaving_names and n in layer.merged_adapters and n not in gone]
            if merged:
                raise ApplyError(
                    f"pipe.fuse_lora() merged forgetpatch's adapter(s) {', '.join(merged)} into {path}; a merged "
                    "patch cannot be taken off exactly. Call pipe.unfuse_lora() first (peft's unmerge leaves float "
                    "rounding, about 1e-7, in those weights)."
                )
        if leaving:
            _keep_changes_made_since(pipe, state)
            layers = adapters.tuner_layers(pipe)
            with adapters.trainability_kept(adapters.reach(pipe, layers, [])):
                _take_off(pipe, state, leaving, _user_sets(layers, _ours(state)))
        gone_digests = {e.digest for e in leaving}
        if orphans := [e for e in state.entries if gone_digests & set(e.patch.manifest.lineage)]:
            warnings.warn(
                f"patch {orphans[0].name!r} was computed on top of "
                f"{', '.join(e.name for e in leaving if e.digest in orphans[0].patch.manifest.lineage)}, which just came "
                "off: it stays on a model it was not made for (a later erase records that state as its lineage). "
                f"Take it off too (forgetpatch.remove(pipe, {orphans[0].name!r})) or put the parent back.",
                UserWarning,
                stacklevel=2,
            )
        if baked:
            warnings.warn(
                f"patch(es) {', '.join(baked)} had been merged into the weights (pipe.fuse_lora()) and then unloaded "
                "(pipe.unload_lora_weights()): forgetpatch no longer lists them, but their change stays in the "
                "weights, where it cannot be taken off exactly. Load the pipeline again to be rid of it.",
                UserWarning,
                stacklevel=2,
            )
    return pipe


def applied(pipe) -> list[AppliedPatch]:
    """The patches on ``pipe``, in application order.

    Raises :class:`~forgetpatch.errors.ApplyError` when one of them is no longer live and cannot be switched
    back on (see the module docstring); never lists a patch that is off.

    Example:
        >>> [(p.name, p.fused) for p in forgetpatch.applied(pipe)]
        [('no-vangogh', False)]
    """
    state = _existing_state(pipe)
    if state is None:
        return []
    with state.lock:
        _verify(state, [pipe])
        return list(state.entries)


@contextlib.contextmanager
def ungated(pipe) -> Iterator[None]:
    """Within it, every patch on ``pipe`` acts, those gated to key steps too (as inside their steps); after it, the
    gate is as it was. For reading weights outside a denoiser call, as closed-form erasure and the inversion attack
    do: otherwise a gated patch is on or off as the last step run left it. Another thread's call of the denoiser
    waits meanwhile.

    Example:
        >>> with ungated(pipe):
        ...     w = forgetpatch.methods.current_weight(pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k)
    """
    state = _existing_state(pipe)
    if state is None:
        yield
        return
    with state.gate:
        with state.lock:
            before = state.active
            every = tuple(e.name for e in state.entries if not e.fused)
            if before != every:
                _switch(state, every)
        try:
            yield
        finally:
            with state.lock:  # unless an apply or remove meanwhile set the adapters anew
                if before != every and state.active == every:
                    _switch(state, tuple(n for n in before if n in {e.name for e in state.entries}))


def unpatched(pipe):
    """A deep copy of ``pipe`` without forgetpatch's patches; ``pipe`` itself is left as it is.

    Everything else on the pipeline comes along (the user's own adapters, scheduler, dtype): the copy is
    the reference an evaluation or an attack compares the patched pipeline with.

    Example:
        >>> pipe = forgetpatch.apply(toy.pipeline(), "./no-circle")
        >>> base = unpatched(pipe)
        >>> forgetpatch.applied(base), len(forgetpatch.applied(pipe))
        ([], 1)
    """
    state = _existing_state(pipe)
    if state is None:
        return copy.deepcopy(pipe)
    with state.lock:
        clone = copy.deepcopy(pipe)
        if not state.entries:
            return clone
        ids = {handle.id for handle in state.hooks}  # copied hooks would act on the original's bookkeeping
        for component in COMPONENTS:
            module = getattr(clone, component, None)
            if isinstance(module, nn.Module):
                for hooks in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs, module._forward_hooks):
                    for i in ids:
                        hooks.pop(i, None)
        clone_unet = _unet(clone)
        clone_state = _State(
            unet=weakref.ref(clone_unet),
            denoiser=state.denoiser,
            entries=list(state.entries),
            num_train_timesteps=state.num_train_timesteps,
            active=state.active,
        )
        _rescan(clone, clone_state, adapters.tuner_layers(clone))
        with _STATES_LOCK:
            _STATES[clone_unet] = clone_state
    return remove(clone)
