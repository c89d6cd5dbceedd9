"""BlockHook (accel_core/families/hooks.py) without a host: a stand-in named like ComfyUI's NextDiT
whose forward calls its blocks directly, as comfy/ldm/lumina/model.py does (no dit hook)."""
from __future__ import annotations

import torch
from torch import nn

from sd_accel.accel_core import families, regional
from sd_accel.accel_core.families import hooks
from sd_accel.accel_core.stepcache import Cuts, StepCacheConfig, StepCacheRun, cut_points


class JointTransformerBlock(nn.Module):
    def __init__(self, d=16, modulation=True):
        super().__init__()
        self.attention, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        self.modulation = modulation

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, timestep_zero_index=None, transformer_options={}):
        h = self.attention(self.norm(x)) * freqs_cis
        return x + (h * adaln_input[:, None, None] if self.modulation else h)


class NextDiT(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.context_refiner = nn.ModuleList(JointTransformerBlock(modulation=False) for _ in range(1))
        self.noise_refiner = nn.ModuleList(JointTransformerBlock() for _ in range(1))
        self.layers = nn.ModuleList(JointTransformerBlock() for _ in range(n))

    def forward(self, x, cap, t, transformer_options={}):
        for layer in self.context_refiner:
            cap = layer(cap, None, 1.0, transformer_options=transformer_options)
        for layer in self.noise_refiner:
            x = layer(x, None, 1.0, t, timestep_zero_index=None, transformer_options=transformer_options)
        img = torch.cat([cap, x], 1)
        for layer in self.layers:
            img = layer(img, None, 1.0, t, timestep_zero_index=None, transformer_options=transformer_options)
        return img


def _hooked(m: NextDiT) -> NextDiT:
    """What ComfyUI's object patches do to the shared model: a BlockHook at each listed block's place."""
    for bl, mods in hooks.needs_hooks(families.family_of(m), m):
        for i in range(len(mods)):
            mods[i] = hooks.hook_for(mods[i], (bl.patch, i), bl.args)
    return m


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 6, 16, generator=g), torch.randn(2, 3, 16, generator=g), torch.rand(2, generator=g)


def test_nextdit_needs_hooks_and_the_cache_cuts_only_its_layers():
    m = NextDiT()
    fam = families.family_of(m)
    assert fam.name == "zimage" and not hooks.native_hook(m, "layers")
    assert [bl.attr for bl, _ in hooks.needs_hooks(fam, m)] == ["context_refiner", "noise_refiner", "layers"]
    assert not regional.is_regional(fam, m) and regional.is_regional(fam, m, hooks=True)  # only a host that can put hooks in
    assert cut_points(m, hooks=True) == [("double_block", i) for i in range(4)]


def test_a_hook_keeps_the_names_and_tensors_and_without_an_entry_is_the_block():
    torch.manual_seed(0)
    m = NextDiT()
    keys = {k: v for k, v in m.state_dict(keep_vars=True).items()}
    x, cap, t = _inputs()
    ref = m(x, cap, t)
    _hooked(m)
    assert type(m.layers[0]).__name__ == "BlockHook"
    after = m.state_dict(keep_vars=True)
    assert list(after) == list(keys) and all(after[k] is v for k, v in keys.items())  # same names, same tensors: nothing copied
    assert torch.equal(m(x, cap, t, transformer_options={}), ref)
    assert hooks.hook_for(m.layers[1], ("double_block", 1), ("img",)) is m.layers[1]  # idempotent
    kinds = families.family_of(m).regions(m)
    assert sorted(kinds) == ["context_refiner:JointTransformerBlock", "layers:JointTransformerBlock", "noise_refiner:JointTransformerBlock"]


def test_an_entry_gets_the_block_call_as_comfyui_dit_hooks_give_it():
    torch.manual_seed(0)
    m = NextDiT()
    x, cap, t = _inputs()
    ref = m(x, cap, t)
    _hooked(m)
    seen = []

    def entry(args, extra):
        seen.append(sorted(args))
        out = extra["original_block"](args)
        return {"img": out["img"] * 2}

    to = {"patches_replace": {"dit": {("double_block", 3): entry}}}
    out = m(x, cap, t, transformer_options=to)
    assert seen == [["img", "mask", "pe", "timestep_zero_index", "transformer_options", "vec"]]
    assert torch.equal(out, ref * 2)


def test_the_step_cache_runs_through_the_hooks():
    torch.manual_seed(0)
    m = _hooked(NextDiT())
    cuts = Cuts(cut_points(m, hooks=True), 1, 0)
    run = StepCacheRun(StepCacheConfig(interval=2), cuts).begin([1.0, 0.5, 0.0])
    x, cap, t = _inputs()

    def entry_for(point):
        return lambda args, extra: run.block(point, args, extra["original_block"], "all", None)

    to = {"patches_replace": {"dit": {p: entry_for(p) for p in cuts.points}}}
    full = m(x, cap, t, transformer_options=to)
    again = m(x, cap, t, transformer_options=to)  # same input, next call: cached
    assert [e["cached"] for e in run.log] == [False, True]
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-6)


class _HookedNextDiT(NextDiT):
    """A later host's NextDiT that looks the dit hook up itself: probed, no BlockHooks."""

    def forward(self, x, cap, t, transformer_options={}):
        dit = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, layer in enumerate(self.layers):
            x = dit[("double_block", i)]({"img": x}, {"original_block": lambda a, b=layer: {"img": b(a["img"], None, 1.0, t)}})["img"] \
                if ("double_block", i) in dit else layer(x, None, 1.0, t)
        return x


def test_a_forward_that_looks_the_hook_up_itself_gets_no_hooks():
    m = _HookedNextDiT()
    fam = families.family_of(m)
    assert hooks.native_hook(m, "layers") and not hooks.native_hook(m, "noise_refiner")
    assert [bl.attr for bl, _ in hooks.needs_hooks(fam, m)] == ["context_refiner", "noise_refiner"]
    assert cut_points(m) == [("double_block", i) for i in range(4)]  # no host hooks needed for the cut
