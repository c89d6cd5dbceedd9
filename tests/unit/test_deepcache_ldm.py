"""The one LDM walk (families/ldm.py) and the one DeepCache runner on a fake host: no ComfyUI or webui needed.

A tiny LDM-shaped UNet with a host's calling conventions (blocks take transformer_options and
output_shape, transformers count transformer_index); tests/integration/test_deepcache_comfy.py
checks the same on ComfyUI's own UNetModel._forward.
"""
import math

import pytest
import torch

from sd_accel.accel_core.deepcaching import DeepCacheConfig, DeepCachePaths, DeepCacheRunner, cut_paths, full_steps
from sd_accel.accel_core.hosts.webui.deepcache import A1111_HOOKS as A1111, FORGE_HOOKS as FORGE, DeepCacheRun
from sd_accel.accel_core.families import ldm


def timestep_embedding(timesteps, dim, repeat_only=False):
    """The fake host's embedding: the walk looks it up in the UNet's module, as it does on the hosts."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Res(torch.nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.emb = torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.Linear(16, cout)

    def forward(self, h, emb):
        return self.conv(h) + self.emb(emb)[:, :, None, None]


class SpatialTransformer(torch.nn.Module):  # the hosts' class name: it counts towards transformer_index
    def __init__(self, c):
        super().__init__()
        self.proj = torch.nn.Linear(8, c)

    def forward(self, h, context, to):
        to["transformer_index"] += 1
        return h + self.proj(context.mean(1))[:, :, None, None]


class Block(torch.nn.Sequential):
    def forward(self, h, emb, context, to=None, output_shape=None):
        to = {"transformer_index": 0} if to is None else to  # A1111's blocks take no options
        for layer in self:
            if isinstance(layer, Res):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, to)
            elif isinstance(layer, torch.nn.Upsample):
                h = torch.nn.functional.interpolate(h, size=tuple(output_shape[2:])) if output_shape else torch.nn.functional.interpolate(h, scale_factor=2)
            else:
                h = layer(h)
        return h


class FakeLDM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model_channels, self.num_classes = 16, None
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.SiLU())
        self.input_blocks = torch.nn.ModuleList([Block(torch.nn.Conv2d(4, 8, 3, padding=1)), Block(Res(8, 8), SpatialTransformer(8)),
                                                 Block(torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)), Block(Res(8, 16), SpatialTransformer(16))])
        self.middle_block = Block(Res(16, 16), SpatialTransformer(16), Res(16, 16))
        self.output_blocks = torch.nn.ModuleList([Block(Res(32, 16), SpatialTransformer(16)), Block(Res(24, 16), torch.nn.Upsample()),
                                                  Block(Res(24, 8), SpatialTransformer(8)), Block(Res(16, 8))])
        self.out = torch.nn.Sequential(torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x, timesteps, context, y=None, control=None, transformer_options=None):
        """The fake host's own forward (no patches): what the walk must reproduce."""
        to = {"transformer_index": 0} if transformer_options is None else transformer_options
        emb, hs, h = self.time_embed(timestep_embedding(timesteps, 16)), [], x
        for m in self.input_blocks:
            hs.append(m(h, emb, context, to))
            h = hs[-1]
        h = self.middle_block(h, emb, context, to)
        for m in self.output_blocks:
            h = m(torch.cat([h, hs.pop()], 1), emb, context, to, hs[-1].shape if hs else None)
        return self.out(h)


class FakeHooks(ldm.LdmHooks):
    patches = ldm.BLOCK_PATCHES

    def block(self, unet, module, h, emb, context, to, output_shape, control, name, kwargs):
        h = module(h, emb, context, to, output_shape)
        return self.apply_control(h, control, name) if name else h


@pytest.fixture
def fake():
    g = torch.Generator().manual_seed(2)
    return FakeLDM().eval(), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 3, 8, generator=g)


def _walks_replay(unet, x, t, c, options, ref, control=None):
    ctl = (lambda: {k: list(v) for k, v in control.items()}) if control else (lambda: None)
    with torch.no_grad():
        assert torch.equal(ldm.forward(unet, FakeHooks(), x, t, c, None, ctl(), options()), ref)
        for d in range(len(unet.input_blocks)):
            full, shallow = ldm.paths(unet, FakeHooks(), d)
            to_full, to_shallow = options(), options()
            out, kept = full(x, t, c, None, ctl(), to_full)
            assert torch.equal(out, ref), d
            assert torch.equal(shallow(kept, x, t, c, None, ctl(), to_shallow), ref), d
            assert to_shallow["transformer_index"] == to_full["transformer_index"] == 5


def test_ldm_walk_is_the_forward_at_every_cut(fake):
    unet, x, t, c = fake
    with torch.no_grad():
        ref = unet(x, t, c)
    _walks_replay(unet, x, t, c, dict, ref)


def test_ldm_walk_honours_middle_block_after_patch(fake):
    unet, x, t, c = fake
    calls = []

    def after_middle(args):
        calls.append(sorted(args))
        return {"h": args["h"] * 0.5 + 0.25}

    hook = unet.middle_block.register_forward_hook(lambda m, i, o: o * 0.5 + 0.25)  # the same change, made by the module
    with torch.no_grad():
        ref = unet(x, t, c)
    hook.remove()
    with torch.no_grad():
        assert not torch.equal(ref, unet(x, t, c))
    _walks_replay(unet, x, t, c, lambda: {"patches": {"middle_block_after_patch": [after_middle]}}, ref)
    assert calls[0] == ["context", "emb", "h", "timesteps", "transformer_options", "x", "y"]
    n = len(calls)
    with torch.no_grad():  # a shallow run does not reach the middle block: its patch is not called
        ldm.shallow(unet, FakeHooks(), 1, 0, torch.zeros(2, 16, 8, 8), x, t, c, None, None, {"patches": {"middle_block_after_patch": [after_middle]}})
    assert len(calls) == n

    class Without(FakeHooks):  # a host whose forward has no such patch leaves it alone
        patches = ldm.BLOCK_PATCHES - {"middle_block_after_patch"}

    with torch.no_grad():
        assert torch.equal(ldm.forward(unet, Without(), x, t, c, None, None, {"patches": {"middle_block_after_patch": [after_middle]}}), unet(x, t, c))


def test_ldm_walk_output_patch_may_merge_the_skip_itself(fake):
    """hsp=None from an output_block_patch (SUPIR) means the patch has concatenated the skip: no second cat."""
    unet, x, t, c = fake
    with torch.no_grad():
        ref = unet(x, t, c)
    _walks_replay(unet, x, t, c, lambda: {"patches": {"output_block_patch": [lambda h, hsp, to: (torch.cat([h, hsp], 1), None)]}}, ref)


def test_ldm_walk_control_residuals_on_the_blocks_that_run(fake):
    unet, x, t, c = fake
    shapes = []
    with torch.no_grad():
            ldm.forward(unet, FakeHooks(), x, t, c, None, None, {"patches": {"input_block_patch": [lambda h, to: (shapes.append(h.shape), h)[1]]}})
    g = torch.Generator().manual_seed(5)
    res = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    control = {"input": list(reversed(res)), "middle": [torch.randn(shapes[-1], generator=g) * 0.1], "output": list(res)}
    with torch.no_grad():
        ref = ldm.forward(unet, FakeHooks(), x, t, c, None, {k: list(v) for k, v in control.items()}, {})
        assert not torch.equal(ref, unet(x, t, c))
    _walks_replay(unet, x, t, c, dict, ref, control)


@pytest.mark.parametrize("clock", ["schedule", "progress"])
def test_one_runner_serves_a_fake_host(fake, clock):
    """The host-agnostic runner on the fake host: decisions follow the schedule, each cond chunk keeps its own feature."""
    unet, x, t, c = fake
    cfg = DeepCacheConfig(cache_interval=3, cache_depth=1)
    runner = DeepCacheRunner(cfg, cut_paths(unet, 1, *ldm.paths(unet, FakeHooks(), 1)))
    sigmas = [14.0, 9.0, 6.0, 4.0, 2.5, 1.5, 0.8, 0.3, 0.0]
    n = len(sigmas) - 1

    def sample(call):
        z = x.clone()
        with torch.no_grad():
            for i in range(n):
                eps = torch.cat([call(i, k, z[k:k + 1], t[:1], c[k:k + 1]) for k in range(2)])  # cond and uncond apart
                z = z - 0.1 * eps
        return z

    def cached(i, k, *a):
        if clock == "schedule":
            return runner(runner.step_at(sigmas[i]), (f"chunk{k}",), *a, None, None, {})
        return runner(*runner.step_from_progress(i, n), *a, None, None, {})

    if clock == "schedule":
        runner.begin(sigmas, n)
    out = sample(cached)
    stats = runner.finish()
    sched = full_steps(n, cfg)
    assert stats["full"] == sum(sched) and stats["hits"] == n - sum(sched) > 0
    base = sample(lambda i, k, *a: unet(*a))
    assert 0 < float((out - base).norm() / base.norm()) < 0.1
    assert runner.runs == [stats] and not runner.running
    webui = DeepCacheRun(unet, cfg, None, None, paths=(runner.paths.full, runner.paths.shallow))
    assert isinstance(webui.runner, DeepCacheRunner)  # the webui's DeepCache is this runner too


def test_the_runner_copies_the_kept_feature_under_cuda_graphs():
    kept = torch.ones(1, 2)

    def full(x):
        return x, kept  # a CUDA-graph replay would overwrite `kept` in place

    for copy_kept in (False, True):
        runner = DeepCacheRunner(DeepCacheConfig(cache_interval=2), DeepCachePaths(full, lambda k, x: k, copy_kept)).begin([2.0, 1.0])
        runner(0, ("all",), torch.zeros(1, 2))
        assert (runner.run.kept.lookup(("all",), 1) is kept) is not copy_kept
        torch.testing.assert_close(runner(1, ("all",), torch.zeros(1, 2)), kept)


def test_webui_hooks_on_the_fake_host(fake):
    """A1111's calling convention reproduces the plain forward; Forge's block modifiers and group-norm
    wrapper (either spelling) run around every block, on full and shallow runs alike."""
    unet, x, t, c = fake
    with torch.no_grad():
        ref = unet(x, t, c)
        assert torch.equal(ldm.forward(unet, A1111, x, t, c), ref)
        full, shallow = ldm.paths(unet, A1111, 2)
        assert torch.equal(shallow(full(x, t, c)[1], x, t, c), ref)
    seen = []

    def modifier(h, when, to):
        seen.append((to["block"], when))
        return h * 1.01 if when == "after" else h

    def options(key="groupnorm_wrapper"):
        return {"block_modifiers": [modifier], key: lambda norm, h, to: norm(h) * 0.5}

    with torch.no_grad():
        forge = ldm.forward(unet, FORGE, x, t, c, None, None, options())
        assert not torch.equal(forge, ref)
        assert torch.equal(ldm.forward(unet, FORGE, x, t, c, None, None, options("group_norm_wrapper")), forge)
        assert seen[-2:] == [(("last", 0), "before"), (("last", 0), "after")] and len(seen) == 2 * (4 + 1 + 4 + 1) * 2
        for d in range(len(unet.input_blocks)):
            full, shallow = ldm.paths(unet, FORGE, d)
            out, kept = full(x, t, c, None, None, options())
            assert torch.equal(out, forge) and torch.equal(shallow(kept, x, t, c, None, None, options()), forge), d
