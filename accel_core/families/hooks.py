"""The block route of a family whose host forward offers no `patches_replace["dit"]` hook.

ComfyUI's Flux, Qwen-Image and Wan hand each transformer block to
`transformer_options["patches_replace"]["dit"][(name, i)]` when an entry is there; that is
what Compile's regional compile and the Step Cache ride. ComfyUI's NextDiT (Z-Image, Lumina 2)
calls its blocks directly (read in 0.3.64, 0.8.0, 0.33 and up to 0.38). For such a block list
(`BlockList.hooked=False`) a host that can replace modules (ComfyUI's object patches on a
clone) puts a `BlockHook` in place of each block: the hook the forward lacks, with the same
calling convention, and nothing else.

A BlockHook owns no weights and copies none: its children and parameters are the block's own
modules and tensors, registered under the same names, so `state_dict()` keys, LoRA key
matching and DynamicVRAM's per-module loading see exactly the names and tensors they saw
before. With no entry for its point in the call's transformer_options it is the block.
"""
from __future__ import annotations

from torch import nn


class BlockHook(nn.Module):
    """Stands in for block `point` (`(name, i)`) of a forward that offers no block hook.

    Called as the block is, it looks up `transformer_options["patches_replace"]["dit"][point]`
    and, when there is an entry, calls it as ComfyUI's DiT forwards do:
    `entry(args, {"original_block": block_wrap})`, where args names the positional inputs
    (`arg_names`, "img" first) and carries the keyword ones, and `block_wrap(args)` returns
    `{"img": block(...)}`. The entry's "img" is the block's output.
    """

    def __init__(self, block: nn.Module, point: tuple[str, int], arg_names: tuple[str, ...]):
        super().__init__()
        object.__setattr__(self, "wrapped_block", block)  # not a child: the names stay the block's
        self.point, self.arg_names = point, tuple(arg_names)
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        own = {k for k in block.state_dict(keep_vars=True) if "." not in k}
        for name, b in block.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name in own)
        self.train(block.training)

    def forward(self, *args, **kwargs):
        block = self.wrapped_block
        to = kwargs.get("transformer_options")
        entry = ((to.get("patches_replace") or {}).get("dit") or {}).get(self.point) if isinstance(to, dict) else None
        if entry is None or len(args) > len(self.arg_names) or any(k in self.arg_names for k in kwargs):
            return block(*args, **kwargs)
        names, kw = self.arg_names[:len(args)], tuple(kwargs)

        def block_wrap(a):
            return {"img": block(*[a[n] for n in names], **{k: a[k] for k in kw})}

        return entry({**dict(zip(names, args)), **kwargs}, {"original_block": block_wrap})["img"]

    def extra_repr(self) -> str:
        return f"point={self.point}, block={type(self.wrapped_block).__name__}"


def unwrap(block: nn.Module) -> nn.Module:
    """The block behind a BlockHook (itself otherwise)."""
    return block.wrapped_block if isinstance(block, BlockHook) else block


def hook_for(block: nn.Module, point: tuple[str, int], arg_names: tuple[str, ...], table: dict | None = None) -> BlockHook:
    """The BlockHook of `block` at `point`. `table` is the owner's (the model's) hooks by point, so nodes
    that install hooks on clones of one model install the same object; without one, a new hook."""
    if isinstance(block, BlockHook):
        return block
    key = (point, tuple(arg_names))
    hook = table.get(key) if table is not None else None
    if hook is None or hook.wrapped_block is not block:
        hook = BlockHook(block, point, arg_names)
        if table is not None:
            table[key] = hook
    return hook


def _codes(code):
    yield code
    for c in code.co_consts:
        if hasattr(c, "co_consts"):
            yield from _codes(c)


def native_hook(module: nn.Module, attr: str) -> bool:
    """Whether `module`'s class (the host's code, probed, not its version) looks up a
    `patches_replace` hook in a method that uses its `attr` block list."""
    for klass in type(module).__mro__:
        if klass in (nn.Module, object):
            continue
        for fn in vars(klass).values():
            code = getattr(fn, "__code__", None)
            if code is None:
                continue
            codes = list(_codes(code))
            if any(attr in c.co_names for c in codes) and any("patches_replace" in c.co_consts for c in codes):
                return True
    return False


def routed(bl, module: nn.Module, hooks: bool) -> bool:
    """Whether block list `bl` of `module` reaches its hook: the forward looks it up, or the host
    puts BlockHooks in place (`hooks`: the host can)."""
    return bl.patch is not None and (bl.hooked or hooks or native_hook(module, bl.attr))


def needs_hooks(family, module: nn.Module) -> list:
    """(BlockList, ModuleList) pairs of `module` whose blocks need BlockHooks to reach their hook."""
    return [(bl, mods) for bl, mods in family.block_lists(module)
            if bl.patch is not None and not bl.hooked and not native_hook(module, bl.attr)]


__all__ = ["BlockHook", "hook_for", "unwrap", "native_hook", "routed", "needs_hooks"]
