"""Putting patches on diffusers pipelines and taking them off again, exactly.

How a patch is applied:

* **unfused** (default): the factors are loaded as a named peft adapter with diffusers'
  ``load_lora_weights(..., adapter_name=...)``; all unfused patches are made active together with
  ``set_adapters`` (peft adds their deltas, in application order).
* **fused** (``fuse=True``): ``scale * (alpha / r) * B @ A`` is added into each targeted weight, the
  same arithmetic as peft's merge, after a copy of the original tensor is kept on the layer. The
  patch is not kept as a peft adapter: peft skips *every* adapter of a layer with a merged one,
  which would silently switch off unfused patches stacked on the same layers.
* **key-step gating** (``key_steps=True``): a forward pre-hook on the UNet reads each call's
  timestep ``t``, computes the trajectory fraction ``1 - t / T`` and activates exactly the adapters
  whose ranges contain it (``set_adapters`` is only called when that set changes, so steady
  stretches cost nothing). Works for any scheduler, step count and classifier-free guidance, since
  it only looks at ``t``. Text-encoder parts of a patch are not gated (the text encoder runs once).

Removal deletes the adapters (unwrapping peft layers once none is left) and copies the kept
originals back into fused weights, so parameters are bit-identical to before ``apply``.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import warnings
import weakref
from collections.abc import Iterable, Sequence
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
    fingerprint,
    read_patch,
    resolve_module,
)

logger = logging.getLogger(__name__)

PatchRef = str | os.PathLike | Patch
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


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

    @property
    def digest(self) -> str:
        return self.patch.digest


@dataclass
class _State:
    entries: list[AppliedPatch] = field(default_factory=list)
    num_train_timesteps: int = 1000
    hook: torch.utils.hooks.RemovableHandle | None = None
    active: tuple[str, ...] | None = None


# Bookkeeping lives with the UNet (adapters live there too), so pipelines built from the same
# components (e.g. an img2img pipeline made from a txt2img one's components) share it.
_STATES: weakref.WeakKeyDictionary[nn.Module, _State] = weakref.WeakKeyDictionary()


def _unet(pipe) -> nn.Module:
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise ApplyError(
            f"{type(pipe).__name__} has no UNet; forgetpatch patches diffusers pipelines with a `unet`"
        )
    return unet


def _state(pipe) -> _State:
    unet = _unet(pipe)
    if unet not in _STATES:
        _STATES[unet] = _State()
    return _STATES[unet]


# --- loading -------------------------------------------------------------------------------
def load(ref: PatchRef) -> Patch:
    """Load a patch from a local folder, a ``.safetensors`` file, or a Hub id ``org/name[@revision]``.

    Example:
        >>> patch = forgetpatch.load("./no-vangogh")
        >>> patch = forgetpatch.load("org/no-vangogh@v1")
    """
    if isinstance(ref, Patch):
        return ref
    if not isinstance(ref, (str, os.PathLike)):
        raise TypeError(f"a patch reference is a path, a Hub id or a Patch, not {type(ref).__name__}")
    path = Path(ref)
    if path.exists():
        return read_patch(path)
    text = str(ref)
    if _HUB_ID.match(text):
        repo_id, _, revision = text.partition("@")
        try:
            from forgetpatch.hub import download
        except (ImportError, AttributeError):
            raise HubError(
                f"{text!r} is not a local path, and Hub downloads are not available in this installation "
                "(forgetpatch.hub.download is missing)"
            ) from None
        return read_patch(download(repo_id, revision=revision or None))
    raise PatchFormatError(
        f"no patch at {text!r}: not an existing folder or file, nor a Hub id like 'org/name'"
    )


def _as_list(refs: PatchRef | Iterable[PatchRef]) -> list[PatchRef]:
    if isinstance(refs, (str, os.PathLike, Patch)):
        return [refs]
    return list(refs)


def _with_parents(patches: list[Patch], state: _State) -> list[Patch]:
    """Each local patch preceded by its lineage parents that are not applied yet, found by digest among the patch
    folders beside it (a chain written by ``forgetpatch chain``: ``chain/step-1 ... step-k``)."""
    present = {e.digest for e in state.entries}
    out: list[Patch] = []
    for patch in patches:
        wanted = [d for d in patch.manifest.lineage if d not in present and d not in {p.digest for p in out}]
        if wanted:
            source = Path(patch.source) if patch.source is not None else None
            if source is not None and source.is_file() and (source.parent / "forgetpatch.json").is_file():
                source = source.parent  # the weights file of a patch folder: look beside the folder
            folder = source.parent if source is not None else None
            found: dict[str, Patch] = {}
            if folder is not None and folder.is_dir():
                for sibling in sorted(folder.iterdir()):
                    if sibling != source and (sibling / "forgetpatch.json").is_file():
                        candidate = read_patch(sibling)
                        found[candidate.digest] = candidate
            missing = [d for d in wanted if d not in found]
            if missing:
                raise LineageError(
                    f"patch {patch.name!r} was computed on top of {len(wanted)} patches; {len(missing)} of them "
                    f"({', '.join(d[:12] for d in missing)}) are neither applied nor in a folder beside it"
                    + (f" ({folder})" if folder is not None else "")
                    + ": apply them first, in order"
                )
            out += [found[d] for d in wanted]
        out.append(patch)
    return out


# --- checks (before anything is changed) ---------------------------------------------------
def _check(pipe, patches: Sequence[Patch], state: _State, strict: bool, fuse: bool, key_steps: bool) -> None:
    present = [e.digest for e in state.entries]
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
        for path in patch.target_modules:
            module = resolve_module(pipe, path)  # MissingModuleError
            if patch.delta_shape(path) != tuple(module.weight.shape):
                raise MissingModuleError(
                    f"patch {patch.name!r} changes {path} with shape {patch.delta_shape(path)}, but the "
                    f"pipeline's module has shape {tuple(module.weight.shape)}: it was made for another architecture"
                )
        expected = patch.manifest.base_model.fingerprint
        if not expected:
            logger.warning("patch %r records no base fingerprint (old format); not checked", patch.name)
        else:
            actual = fingerprint(pipe, expected)
            wrong = [p for p, fp in expected.items() if actual[p] != fp]
            if wrong:
                base = patch.manifest.base_model.id or "another model"
                raise FingerprintMismatchError(
                    f"patch {patch.name!r} was made for {base}: the base weights of {len(wrong)} of its "
                    f"{len(expected)} modules differ from this pipeline's (first: {wrong[0]}). "
                    "Apply it to the model it was made for."
                )
        if strict:
            missing = [d for d in patch.manifest.lineage if d not in present]
            if missing:
                raise LineageError(
                    f"patch {patch.name!r} was computed on top of patches that are not applied: "
                    f"{', '.join(d[:12] for d in missing)}. Apply those first (in order), or pass strict=False."
                )
        present.append(patch.digest)


# --- mutation ------------------------------------------------------------------------------
def _adapter_names(pipe) -> set[str]:
    names: set[str] = set()
    for component in COMPONENTS:
        config = getattr(getattr(pipe, component, None), "peft_config", None)
        names.update(config or {})
    return names


def _unique_name(pipe, state: _State, wanted: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "_", wanted) or "patch"
    taken = _adapter_names(pipe) | {e.name for e in state.entries}
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


@torch.no_grad()
def _fuse(pipe, patch: Patch, scale: float) -> None:
    stashed: list[nn.Module] = []
    try:
        for path in patch.target_modules:
            layer = resolve_module(pipe, path)
            w = layer.weight
            delta = patch.delta(path).to(w.device)
            if scale != 1.0:
                delta.mul_(scale)
            if getattr(layer, ORIGINAL_WEIGHT_ATTR, None) is None:
                setattr(layer, ORIGINAL_WEIGHT_ATTR, w.detach().clone())
                stashed.append(layer)
            if w.dtype == torch.float32:
                w.add_(delta)
            else:  # add in float32, round once
                w.copy_((w.float() + delta).to(w.dtype))
    except BaseException:
        for layer in stashed:  # undo this patch's fresh stashes; older ones are restored by the caller
            layer.weight.copy_(getattr(layer, ORIGINAL_WEIGHT_ATTR))
            delattr(layer, ORIGINAL_WEIGHT_ATTR)
        raise


@torch.no_grad()
def _restore_fused(pipe, entries: Iterable[AppliedPatch]) -> None:
    for entry in entries:
        for path in entry.patch.target_modules:
            layer = resolve_module(pipe, path)
            original = getattr(layer, ORIGINAL_WEIGHT_ATTR, None)
            if original is not None:
                layer.weight.copy_(original)
                delattr(layer, ORIGINAL_WEIGHT_ATTR)


def _load_adapter(pipe, patch: Patch, name: str) -> None:
    if not hasattr(pipe, "load_lora_weights"):
        raise ApplyError(f"{type(pipe).__name__} cannot load LoRA adapters (no load_lora_weights)")
    # Fold alpha / r into B so diffusers' inferred config (alpha = r per module) gives the exact delta.
    state_dict = {}
    for path, (A, B) in patch.factors().items():
        s = patch.scale_of(path)
        state_dict[f"{path}.lora_A.weight"] = A
        state_dict[f"{path}.lora_B.weight"] = B if s == 1.0 else B * s
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Quiet expected chatter: transformers' load report lists the *other* adapters' keys as "missing",
    # diffusers warns about components the patch does not touch.
    loggers = (transformers_logging, diffusers_logging)
    verbosity = [lib.get_verbosity() for lib in loggers]
    try:
        for lib in loggers:
            lib.set_verbosity_error()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(state_dict, adapter_name=name, low_cpu_mem_usage=True)
    finally:
        for lib, level in zip(loggers, verbosity, strict=True):
            lib.set_verbosity(level)


def _is_active(entry: AppliedPatch, fraction: float) -> bool:
    return entry.ranges is None or any(r.start <= fraction <= r.end for r in entry.ranges)


def _activate(unet: nn.Module, state: _State, names: tuple[str, ...]) -> None:
    scales = {e.name: e.scale for e in state.entries}
    unet_names = [n for n in names if n in (getattr(unet, "peft_config", None) or {})]
    if unet_names:
        unet.enable_lora()
        unet.set_adapters(unet_names, weights=[scales[n] for n in unet_names])
    elif getattr(unet, "peft_config", None):
        unet.disable_lora()
    state.active = names


def _sync(pipe, state: _State) -> None:
    """Make the adapters' activity match ``state`` (all unfused on; gated ones per step)."""
    unfused = [e for e in state.entries if not e.fused]
    if unfused:
        pipe.set_adapters([e.name for e in unfused], adapter_weights=[e.scale for e in unfused])
        unet = _unet(pipe)
        if getattr(unet, "peft_config", None):
            unet.enable_lora()  # the gate may have switched the UNet's adapters off at the last step
        state.active = tuple(e.name for e in unfused)
    else:
        state.active = None
    gated = any(e.ranges is not None for e in unfused)
    if gated and state.hook is None:
        state.hook = _unet(pipe).register_forward_pre_hook(_gate_hook(state), with_kwargs=True)
    elif not gated and state.hook is not None:
        state.hook.remove()
        state.hook = None


def _gate_hook(state: _State):
    def hook(unet, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1] if len(args) > 1 else None
        if timestep is None:
            return None
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        fraction = 1.0 - t / state.num_train_timesteps
        names = tuple(e.name for e in state.entries if not e.fused and _is_active(e, fraction))
        if names != state.active:
            _activate(unet, state, names)
        return None

    return hook


def _no_adapters_left(pipe) -> bool:
    return not _adapter_names(pipe)


def _take_off(pipe, state: _State, leaving: list[AppliedPatch]) -> None:
    leaving_names = {e.name for e in leaving}
    remaining = [e for e in state.entries if e.name not in leaving_names]
    if any(e.fused for e in leaving):
        # restore every fused weight exactly, then re-fuse what stays, in order
        _restore_fused(pipe, [e for e in state.entries if e.fused])
        for e in remaining:
            if e.fused:
                _fuse(pipe, e.patch, e.scale)
    adapters = [e.name for e in leaving if not e.fused and e.name in _adapter_names(pipe)]
    if adapters:
        pipe.delete_adapters(adapters)
        if _no_adapters_left(pipe):
            pipe.unload_lora_weights()  # unwrap peft layers: the original modules come back
    state.entries = remaining
    _sync(pipe, state)


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
):
    """Apply one or several patches to ``pipe`` (in order, additively) and return ``pipe``.

    Args:
        refs: a ref or a list of refs: local folder, ``.safetensors`` file, Hub id, or :class:`Patch`.
        scale: multiplier of every patch's change (1.0 = as made).
        fuse: merge into the weights (zero inference overhead); still exactly removable.
        key_steps: gate each patch to its recorded key-step ranges (patches without ranges stay on).
        strict: refuse patches whose lineage parents are not applied.
        with_lineage: first apply a patch's lineage parents that are not on yet, in order, found among the patch
            folders beside it (``apply(pipe, "chain/step-5", with_lineage=True)`` puts steps 1-4 on first).

    Raises :class:`~forgetpatch.errors.ApplyError` subclasses (fingerprint mismatch, missing module,
    already applied, lineage) or :class:`~forgetpatch.errors.PatchFormatError`; then the pipeline is
    exactly as it was.

    Example:
        >>> pipe = forgetpatch.apply(pipe, ["org/no-vangogh", "./no-church"], key_steps=True)
        >>> [p.name for p in forgetpatch.applied(pipe)]
        ['no-vangogh', 'no-church']
    """
    patches = [load(ref) for ref in _as_list(refs)]
    state = _state(pipe)
    if with_lineage:
        patches = _with_parents(patches, state)
    _check(pipe, patches, state, strict, fuse, key_steps)
    scheduler = getattr(pipe, "scheduler", None)
    state.num_train_timesteps = int(
        getattr(getattr(scheduler, "config", {}), "num_train_timesteps", 1000) or 1000
    )
    added: list[AppliedPatch] = []
    before = _adapter_names(pipe)
    try:
        for patch in patches:
            entry = AppliedPatch(
                name=_unique_name(pipe, state, patch.name),
                patch=patch,
                scale=float(scale),
                fused=fuse,
                ranges=list(patch.manifest.key_steps) if key_steps and patch.manifest.key_steps else None,
            )
            if fuse:
                _fuse(pipe, patch, float(scale))
            else:
                _load_adapter(pipe, patch, entry.name)
            state.entries.append(entry)
            added.append(entry)
        _sync(pipe, state)
    except BaseException as exc:
        _take_off(pipe, state, added)
        stray = sorted(_adapter_names(pipe) - before)  # an adapter whose loading failed half-way
        if stray:
            pipe.delete_adapters(stray)
            if _no_adapters_left(pipe):
                pipe.unload_lora_weights()
        if isinstance(exc, ForgetPatchError) or not isinstance(exc, Exception):
            raise
        raise ApplyError(f"applying patches failed and was undone: {exc}") from exc
    return pipe


def remove(pipe, names: str | Patch | Iterable[str | Patch] | None = None):
    """Take patches off ``pipe`` (all when ``names`` is None) and return ``pipe``.

    ``names`` are adapter names, patch names, digests or :class:`Patch` objects. Afterwards every
    parameter is bit-identical to what it was before those patches were applied.

    Example:
        >>> forgetpatch.remove(pipe, "no-vangogh")
        >>> forgetpatch.remove(pipe)                 # everything
    """
    state = _state(pipe)
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
    if leaving:
        _take_off(pipe, state, leaving)
    return pipe


def applied(pipe) -> list[AppliedPatch]:
    """The patches on ``pipe``, in application order.

    Example:
        >>> [(p.name, p.fused) for p in forgetpatch.applied(pipe)]
        [('no-vangogh', False)]
    """
    unet = getattr(pipe, "unet", None)
    state = _STATES.get(unet) if isinstance(unet, nn.Module) else None
    return list(state.entries) if state else []


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
    unet = _unet(pipe)
    state = _STATES.get(unet)
    clone = copy.deepcopy(pipe)
    if state is None or not state.entries:
        return clone
    clone_unet = _unet(clone)
    if state.hook is not None:  # the copied gate hook would act on the original's bookkeeping
        for hooks in (clone_unet._forward_pre_hooks, clone_unet._forward_pre_hooks_with_kwargs):
            hooks.pop(state.hook.id, None)
    _STATES[clone_unet] = _State(
        entries=list(state.entries), num_train_timesteps=state.num_train_timesteps, active=state.active
    )
    return remove(clone)

