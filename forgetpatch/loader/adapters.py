"""forgetpatch's adapters as peft layers on a pipeline: finding peft layers, putting a patch's adapter on, deleting it.

A patch's unfused adapter is a peft LoRA adapter like any other: ``inject`` puts peft's own LoRA layers on the
patch's target layers (wrapping a bare ``Linear`` / ``Conv2d``, or adding to a layer that already carries the user's
adapters) and registers the adapter's config in the component's ``peft_config``, where diffusers keeps the configs
it loads, so diffusers' ``set_adapters`` / ``delete_adapters`` / ``fuse_lora`` and a user's later
``load_lora_weights`` see it. Only the targets are visited: diffusers' ``load_lora_weights`` walks the whole
UNet several times, which was most of ``apply``'s time on SD 1.5 (``benchmarks/apply.py``). On a pipeline whose
components carry offloading or other hooks, or are quantized (:func:`direct` is false), ``load_adapter`` and
``delete_adapters`` use diffusers' ``load_lora_weights`` / ``delete_adapters``, which take those hooks off and
put them back; so does ``load_adapter`` with a peft whose LoRA layers :func:`inject` cannot build
(:func:`peft_takes_config`). Which adapters are active is :mod:`forgetpatch.loader.core`'s business, not this module's.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from forgetpatch.errors import ApplyError
from forgetpatch.format import COMPONENTS, Patch
from forgetpatch.loader.families import unwrap

#: Loading and deleting adapters quiet log levels and warning filters, which are process-wide.
QUIET_LOCK = threading.Lock()


def tuner_layers(pipe) -> list[tuple[str, nn.Module]]:
    """(module path, layer) of every peft layer in the pipeline's components. Components without a
    ``peft_config`` are not walked: every way of putting adapters on a model (diffusers' and transformers'
    loaders, peft's ``inject_adapter_in_model``, forgetpatch) leaves one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for component in COMPONENTS:
        module = unwrap(getattr(pipe, component, None))
        if isinstance(module, nn.Module) and getattr(module, "peft_config", None):
            out += [
                (f"{component}.{n}", m) for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)
            ]
    return out


def module_at(pipe, path: str) -> nn.Module:
    """The module at ``path`` (already resolved by ``resolve_module``), a peft layer wrapping it included."""
    component, _, rest = path.partition(".")
    return getattr(pipe, component).get_submodule(rest)


def wrapper(pipe, path: str) -> nn.Module | None:
    """The peft layer wrapping the module at ``path`` (already resolved by ``resolve_module``), if any."""
    module = module_at(pipe, path)
    return module if hasattr(module, "merged_adapters") else None


@contextmanager
def merges_kept(pipe) -> Iterator[None]:
    """peft unmerges every fused LoRA of a model it injects a new adapter into; hide the merges meanwhile, so a
    user's fused LoRA stays fused, bit for bit."""
    merged = [(layer, layer.merged_adapters) for _, layer in tuner_layers(pipe) if layer.merged_adapters]
    for layer, _ in merged:
        layer.merged_adapters = []
    try:
        yield
    finally:
        for layer, names in merged:
            layer.merged_adapters = names


@contextmanager
def trainability_kept(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every parameter under ``modules`` keeps its ``requires_grad``; parameters created meanwhile (a patch's
    adapter) are frozen. peft makes every adapter it activates trainable (``set_adapter``, which ``update_layer``
    and ``delete_adapter`` call), and its whole-model injection freezes the rest of the model."""
    modules = [m for m in modules if isinstance(m, nn.Module)]
    params = [p for m in modules for p in m.parameters()]  # held, so that no id is reused meanwhile
    flags = {id(p): p.requires_grad for p in params}  # by id: hashing a tensor is slower
    try:
        yield
    finally:
        for m in modules:
            for p in m.parameters():
                if p.requires_grad != flags.get(id(p), False):
                    p.requires_grad_(flags.get(id(p), False))


def reach(pipe, layers: list[tuple[str, nn.Module]], paths: Iterable[str]) -> list[nn.Module]:
    """The modules whose parameters putting adapters on ``paths``, or taking adapters off, may change the
    ``requires_grad`` of (for :func:`trainability_kept`): when :func:`inject` puts them on and adapters are deleted
    directly, the peft layers ``layers`` and the modules holding ``paths`` (where a layer wrapped meanwhile is
    found); otherwise every component, since peft's whole-model injection freezes the rest of the model. Walking
    only these keeps the cost of ``apply`` and ``remove`` independent of the model's size."""
    paths = list(paths)
    if not injects(pipe, paths):
        return [unwrap(m) for c in COMPONENTS if isinstance(m := getattr(pipe, c, None), nn.Module)]
    holders = {}
    for path in paths:
        component, _, rest = path.partition(".")
        parent = rest.rpartition(".")[0]
        model = unwrap(getattr(pipe, component))
        holder = model.get_submodule(parent) if parent else model
        holders[id(holder)] = holder
    return [layer for _, layer in layers] + list(holders.values())


def activate(layer: nn.Module, names: list[str]) -> None:
    """Make ``names`` the active adapters of one peft layer, every parameter's ``requires_grad`` kept."""
    with trainability_kept([layer]):
        layer.set_adapter(names)


def projection_owner(pipe, path: str) -> nn.Module | None:
    """The attention module whose query/key/value projection is at ``path``, or ``None`` for another layer."""
    parent, _, leaf = path.rpartition(".")
    if leaf not in FUSED_PROJECTIONS:
        return None
    component, _, rest = parent.partition(".")
    try:
        owner = unwrap(getattr(pipe, component)).get_submodule(rest)
    except AttributeError:
        return None
    return owner if hasattr(owner, "fused_projections") else None


def runs_fused(attention: nn.Module) -> bool:
    """Whether ``attention`` runs on fused copies of its projections (``pipe.fuse_qkv_projections()``: ``to_qkv``,
    ``to_kv``), so that a change to ``to_q`` / ``to_k`` / ``to_v`` themselves does nothing."""
    if not getattr(attention, "fused_projections", False):
        return False
    if hasattr(attention, "unfuse_projections"):  # diffusers' attention mixin: the flag says what runs
        return True
    # the older ``Attention`` keeps the flag after unfuse_qkv_projections(); its processor says what runs
    return type(getattr(attention, "processor", None)).__name__.startswith("Fused")


def bypassed(pipe, path: str) -> bool:
    """Whether a change to the layer at ``path`` does nothing because its attention runs on fused copies."""
    owner = projection_owner(pipe, path)
    return owner is not None and runs_fused(owner)


#: Projections that diffusers' ``fuse_qkv_projections`` copies into fused layers.
FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def adapter_names(pipe) -> set[str]:
    names: set[str] = set()
    for component in COMPONENTS:
        config = getattr(getattr(pipe, component, None), "peft_config", None)
        names.update(config or {})
    return names


def direct(pipe) -> bool:
    """Whether adapters can be put on this pipeline's layers directly. Not when a component is offloaded or
    hooked (accelerate's ``_hf_hook``, diffusers' hook registry), quantized, or prepared for compiled hotswap:
    diffusers' ``load_lora_weights`` / ``delete_adapters`` take those hooks off and put them back."""
    for component in getattr(pipe, "components", {}).values():
        if not isinstance(component, nn.Module):
            continue
        if hasattr(component, "_hf_hook") or hasattr(component, "_diffusers_hook"):
            return False
        if getattr(component, "hf_quantizer", None) is not None or getattr(component, "quantization_config", None):
            return False
        if getattr(component, "_prepare_lora_hotswap_kwargs", None) is not None:
            return False
    return True


def injects(pipe, paths: Iterable[str]) -> bool:
    """Whether :func:`load_adapter` puts an adapter on ``paths`` with :func:`inject`, and :func:`delete_adapters`
    deletes adapters directly (not with diffusers' loader)."""
    return direct(pipe) and all(lora_layer(module_at(pipe, path)) for path in paths)


def lora_config(ranks: dict[str, int]):
    """The peft config of one patch's adapter on one component: rank per module, alpha = rank (scale 1)."""
    from peft import LoraConfig

    r = max(ranks.values())
    pattern = {key: rank for key, rank in ranks.items() if rank != r}
    return LoraConfig(r=r, lora_alpha=r, target_modules=list(ranks), rank_pattern=pattern, alpha_pattern=pattern)


@functools.cache
def peft_takes_config() -> bool:
    """Whether this peft's LoRA layers take their settings as one ``LoraConfig`` (``config=``), as :func:`inject`
    builds them; older peft releases (the package allows >= 0.12) take them one by one, and then diffusers' loader
    places every adapter."""
    from peft.tuners.lora import Linear, LoraLayer

    return all("config" in inspect.signature(f).parameters for f in (LoraLayer.update_layer, Linear.__init__))


def lora_layer(module: nn.Module) -> type | None:
    """peft's LoRA layer class for ``module`` (a ``Linear`` or ``Conv2d``, bare or already wrapped by peft), or
    ``None`` for anything else, or with a peft whose layers :func:`inject` cannot build (then diffusers' loader
    places the adapter)."""
    from peft.tuners.lora import Conv2d, Linear, LoraLayer

    if not peft_takes_config():
        return None
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if type(module) not in (Linear, Conv2d, nn.Linear, nn.Conv2d) or type(base) not in (nn.Linear, nn.Conv2d):
        return None
    return Linear if type(base) is nn.Linear else Conv2d


def inject(pipe, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str) -> None:
    """Put adapter ``name`` (``path -> (lora_A, lora_B)``, alpha = rank) on its target layers with peft's LoRA
    layers: a bare layer is wrapped (as peft's ``inject_adapter_in_model`` would), a peft layer gets one more
    adapter (``update_layer``). Nothing else in the model is visited, which makes this far cheaper than
    ``load_lora_weights`` on a large UNet. Each component then carries the adapter's config in ``peft_config``, as
    ``load_lora_weights`` leaves it, so diffusers' ``set_adapters`` / ``delete_adapters`` / ``fuse_lora`` see it.
    Unlike peft's whole-model injection, the ``requires_grad`` of the model's own parameters is left alone."""
    from peft.tuners.lora import LoraLayer

    by_component: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, pair in factors.items():
        component, _, rest = path.partition(".")
        by_component.setdefault(component, {})[rest] = pair
    for component, modules in by_component.items():
        model = getattr(pipe, component)
        ranks = {rest: A.shape[0] for rest, (A, _) in modules.items()}
        config = lora_config(ranks)
        # registered first: if a layer fails half-way, apply's rollback finds the adapter by name and deletes it
        if getattr(model, "peft_config", None) is None:
            model.peft_config = {}
        model.peft_config[name] = config
        model._hf_peft_config_loaded = True
        for rest, (A, B) in modules.items():
            target, r = model.get_submodule(rest), ranks[rest]
            if isinstance(target, LoraLayer):
                target.update_layer(name, r, lora_alpha=r, config=config)
                layer = target
            else:
                layer = lora_layer(target)(target, name, config=config, r=r, lora_alpha=r)
                parent, _, child = rest.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer)
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)


def load_adapter(pipe, patch: Patch, name: str) -> None:
    if not hasattr(pipe, "load_lora_weights"):
        raise ApplyError(f"{type(pipe).__name__} cannot load LoRA adapters (no load_lora_weights)")
    # Fold alpha / r into B so the config (alpha = r per module) gives the exact delta.
    factors = {}
    for path, (A, B) in patch.factors().items():
        s = patch.scale_of(path)
        factors[path] = (A, B if s == 1.0 else B * s)
    if injects(pipe, factors):
        inject(pipe, factors, name)
        return
    state_dict = {}
    for path, (A, B) in factors.items():
        state_dict[f"{path}.lora_A.weight"] = A
        state_dict[f"{path}.lora_B.weight"] = B
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Quiet expected chatter: transformers' load report lists the *other* adapters' keys as "missing",
    # diffusers warns about components the patch does not touch. Log levels and warning filters are
    # process-wide, hence the global lock. low_cpu_mem_usage=False: peft's low-memory path patches
    # nn.Module.register_parameter process-wide (models built meanwhile in other threads got meta weights).
    loggers = (transformers_logging, diffusers_logging)
    with QUIET_LOCK, merges_kept(pipe):
        verbosity = [lib.get_verbosity() for lib in loggers]
        try:
            for lib in loggers:
                lib.set_verbosity_error()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(state_dict, adapter_name=name, low_cpu_mem_usage=False)
        finally:
            for lib, level in zip(loggers, verbosity, strict=True):
                lib.set_verbosity(level)


def delete_adapters(pipe, names: list[str]) -> None:
    """Delete adapters, then unwrap the peft layers left with none."""
    layers = tuner_layers(pipe)
    if direct(pipe):
        gone = set(names)
        # peft makes another adapter active when an active one is deleted; _sync sets the active sets right after
        with QUIET_LOCK, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            for _, layer in layers:
                for name in gone & set(getattr(layer, "lora_A", {})):
                    layer.delete_adapter(name)
        for component in COMPONENTS:
            config = getattr(getattr(pipe, component, None), "peft_config", None)
            for name in gone & set(config or {}):
                del config[name]
    else:
        with QUIET_LOCK, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            pipe.delete_adapters(names)
        if not adapter_names(pipe):
            pipe.unload_lora_weights()  # unwrap peft layers: the original modules come back
            return
        layers = tuner_layers(pipe)
    for path, layer in layers:
        if not any(len(getattr(layer, attr)) for attr in layer.adapter_layer_names):
            component, _, rest = path.partition(".")
            parent, _, child = rest.rpartition(".")
            owner = getattr(pipe, component)
            setattr(owner.get_submodule(parent) if parent else owner, child, layer.get_base_layer())
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        if getattr(module, "peft_config", None) == {}:
            del module.peft_config
            module._hf_peft_config_loaded = None
