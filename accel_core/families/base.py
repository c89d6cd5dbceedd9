"""The registry of model families: the `Family` description, `register`, and the questions
features ask of it (which family a module is, its compile units, ...). The family files register
themselves; `families/__init__.py` imports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import SDAccelError
from .hooks import unwrap


@dataclass(frozen=True)
class BlockList:
    """One list of repeated blocks of a DiT model.

    attr: the module attribute holding them ("double_blocks").
    patch: the name of block i's hook in `transformer_options["patches_replace"]["dit"]`
        (`(patch, i)`, e.g. "double_block"), or None: no hook, the blocks are neither compiled
        regionally nor cut.
    hooked: the block route. True: the host's forward looks the hook up itself (ComfyUI's Flux,
        Qwen-Image, Wan). False: it does not (ComfyUI's NextDiT, read up to 0.38), so a host that
        can replace modules puts a `hooks.BlockHook` in place of each block, which offers the
        hook; unless `hooks.native_hook` finds the lookup in the class (a later host added one).
    args: hooked=False: the names the BlockHook gives the block's positional arguments in the
        hook's args dict ("img" first: what a step cache measures and stands in for).
    cut: whether a step cache may cut between these blocks (False: they always run; e.g. refiners
        that see only the text, where a residual of the image means nothing).
    """

    attr: str
    patch: str | None = None
    hooked: bool = True
    args: tuple[str, ...] = ("img",)
    cut: bool = True


# lora_keys(module) -> {name a LoRA file may use for a layer: (parameter name, slice or None)}.
# The slice (dim, start, size) places a LoRA on part of a fused weight (Flux's qkv).
LoraKeys = Callable[[nn.Module], dict]


@dataclass(frozen=True)
class Family:
    """What the core knows about one model family.

    name, display: a short id ("flux") and what messages call it ("Flux (DiT)").
    probe(module): True for a module of this family (class name / attributes; never imports a host).
    entry: the methods a host routes through, in order of preference; the first the module's
        class has is used (ComfyUI's UNetModel and DiT classes: "_forward", the body inside their
        DIFFUSION_MODEL wrapper chain; elsewhere "forward").
    blocks: DiT models: the repeated transformer blocks. Compile compiles them regionally (one
        callable per block kind, reused by identical blocks); a step cache may cut between them.
    units(module): compile units for a whole-module compile that failed (UNets); None: children.
    lora_keys(module): the LoRA name map (None: a LoRA's layer names must be the module's own).
    skip_count(module): UNets: how many skip connections (DeepCache's cut depths) it has.
    host_walk: a forward walk driven by a host's hooks object (families/ldm.py), for hosts that
        cut the model themselves; walk: a host-free cut walk with `full`/`shallow` (families/diffusers.py).
    keep_dtype: module / tensor names whose weights and buffers a cast leaves in their dtype (the
        class builds them fp32 and feeds them fp32, e.g. Wan's patch embedding); a name matches a
        whole dotted path or any run of its segments ("adaln_proj" is every block's). Or a function
        of the module giving those names (a variant builds some parts fp32, others not).
    fp8_skip: substrings of layer names that stay in the compute dtype under fp8 matmuls (the
        timestep / modulation layers: one row per image, nothing to gain, and they steer every
        block); None: fp8.FP8Config's default (the LDM UNet's).
    lora_hints: fragments of LoRA layer names that say a file was made for this family (the
        message for a LoRA that does not fit names the family it looks made for).
    block_options: transformer_options keys its blocks read beyond the attention override (switches
        a guidance node sets per call or block): a compiled block is handed them, and dynamo guards on them.
    """

    name: str
    display: str
    probe: Callable[[nn.Module], bool]
    entry: tuple[str, ...] = ("forward",)
    blocks: tuple[BlockList, ...] = ()
    units: Callable[[nn.Module], list] | None = None
    lora_keys: LoraKeys | None = None
    skip_count: Callable[[nn.Module], int] | None = None
    host_walk: object = None
    walk: object = None
    keep_dtype: tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]] = ()
    fp8_skip: tuple[str, ...] | None = None
    lora_hints: tuple[str, ...] = ()
    block_options: tuple[str, ...] = ()

    def keeps_dtype(self, name: str, module: nn.Module | None = None) -> bool:
        """Whether tensor `name` of `module` stays in its dtype when the model is cast (the family's class pins it)."""
        names = self.keep_dtype(module) if callable(self.keep_dtype) else self.keep_dtype
        path = f".{name}."
        return any(f".{p}." in path for p in names)

    def entry_of(self, module: nn.Module) -> str:
        """The method name a host routes `module` through."""
        return next((m for m in self.entry if callable(getattr(type(module), m, None))), "forward")

    def block_lists(self, module: nn.Module) -> list[tuple[BlockList, nn.ModuleList]]:
        """The block lists `module` actually has (a variant may lack one, e.g. Flux.2 vs Chroma)."""
        out = []
        for bl in self.blocks:
            mods = getattr(module, bl.attr, None)
            if isinstance(mods, nn.ModuleList) and len(mods):
                out.append((bl, mods))
        return out

    def regions(self, module: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
        """Blocks grouped by kind (class name + list): one compiled callable serves each group."""
        groups: dict[str, list[tuple[str, nn.Module]]] = {}
        for bl, mods in self.block_lists(module):
            for i, block in enumerate(mods):
                block = unwrap(block)  # a host's BlockHook in place of the block (hooks.py)
                groups.setdefault(f"{bl.attr}:{type(block).__name__}", []).append((f"{bl.attr}.{i}", block))
        return groups


_FAMILIES: list[Family] = []  # the registry: filled once at import by the family files below


def register(family: Family) -> Family:
    """Add a family (once per name; a second registration of the same name replaces the first)."""
    for i, f in enumerate(_FAMILIES):
        if f.name == family.name:
            _FAMILIES[i] = family
            return family
    _FAMILIES.append(family)
    return family


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES)


def family_of(module) -> Family | None:
    """The family of `module`, or None for a module the core does not know."""
    if not isinstance(module, nn.Module):
        return None
    for fam in _FAMILIES:
        try:
            if fam.probe(module):
                return fam
        except Exception:  # a probe is a question, never a failure of the caller
            continue
    return None


def known_names() -> str:
    return ", ".join(f.display for f in _FAMILIES)


def require(module, feature: str, need: str | None = None) -> Family:
    """The family of `module`, which must offer slot `need`; else an SDAccelError saying what is supported."""
    fam = family_of(module)
    if fam is not None and (need is None or getattr(fam, need)):
        return fam
    able = [f.display for f in _FAMILIES if need is None or getattr(f, need)]
    found = type(module).__name__ if fam is None else f"{type(module).__name__} ({fam.display})"
    raise SDAccelError(f"SD Accel {feature}: expected one of: {', '.join(able)}; found {found}. "
                       f"Use {feature} on one of those models; the model was left unchanged.")


def skip_count(module) -> int:
    """How many skip connections (DeepCache's possible cut depths) a UNet has."""
    return require(module, "DeepCache", "skip_count").skip_count(module)


def describe(module) -> str:
    fam = family_of(module)
    if fam is None:
        return type(module).__name__
    p = next(module.parameters(), None)
    where = f"{p.dtype}, {p.device}" if p is not None else "no parameters"
    return f"{type(module).__name__} ({fam.name}, {sum(x.numel() for x in module.parameters()) / 1e6:.1f}M params, {where})"


def flatten(prefix: str, module: nn.Module):
    # Containers (ModuleList, Sequential, TimestepEmbedSequential) are not called as units:
    # their host iterates them, so a unit is each of their children.
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
        for i, child in enumerate(module):
            yield from flatten(f"{prefix}.{i}", child)
    else:
        yield prefix, module


def units_of(module: nn.Module, names) -> list[tuple[str, nn.Module]]:
    """The named children of `module` (flattened through containers) that hold weights."""
    units = []
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            units.extend(flatten(name, child))
    return [(n, m) for n, m in units if any(True for _ in m.parameters()) or len(list(m.children()))]


def compile_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules to compile one by one when the whole module cannot be compiled.

    Each unit is a module its host calls through `module(...)`, so replacing its `forward`
    for the duration of a call is enough to route it through a compiled callable.
    """
    fam = family_of(module)
    if fam is not None and fam.units is not None:
        return fam.units(module)
    return units_of(module, [n for n, _ in module.named_children()])


def split_unit(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of a unit that failed to compile, to try one level finer."""
    out = []
    for child_name, child in module.named_children():
        out.extend(flatten(f"{name}.{child_name}", child))
    return [(n, m) for n, m in out if any(True for _ in m.parameters())]


@dataclass
class ModuleDtype:
    dtype: torch.dtype
    device: torch.device


def module_dtype(module: nn.Module) -> ModuleDtype:
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is None:
        return ModuleDtype(torch.float32, torch.device("cpu"))
    return ModuleDtype(p.dtype, p.device)
