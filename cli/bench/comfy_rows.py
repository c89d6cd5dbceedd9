"""`sd-accel bench --host comfy`: the rows, each through ComfyUI's own loader, nodes and sampler.

The harness (model, inputs, timing, diagnostics) is in `comfy.py`; this file says what is measured.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from ...accel_core.errors import SDAccelError
from ...accel_core.log import logger
from .comfy import BASELINE, PRESETS, ComfyBench, builtin_compile, inductor_patch, our_cast, our_compile, comfy_version
from .measure import BenchConfig, BenchResult
from .warmup import COLD, WARM, warmup_rows

def rows(b: ComfyBench):
    if b.preset.dit:
        from . import dit_rows

        yield from dit_rows.rows(b)
        return
    base = b.model
    yield b.measure(BASELINE, lambda: base)
    yield b.measure("comfy TorchCompileModel (built-in, inductor)", lambda: builtin_compile(base))
    yield b.measure("SDAccelCompileUNet inductor default", lambda: our_compile(base, "default"))
    if b.device != "cuda":
        return  # CUDA graphs and fp16 are the GPU path
    yield b.measure("comfy TorchCompileModel (built-in, cudagraphs)", lambda: builtin_compile(base, "cudagraphs"))
    ro = lambda: our_compile(base, "reduce-overhead")  # noqa: E731
    ro_cast = lambda: our_compile(our_cast(base), "reduce-overhead")  # noqa: E731
    yield b.measure("SDAccelCompileUNet inductor reduce-overhead", ro)
    yield b.measure("SDAccelFP16Cast channels_last + SDAccelCompileUNet reduce-overhead", ro_cast)
    if _has("..nodes.deepcache"):
        dc = lambda m: _deepcache(m, 3)  # noqa: E731
        yield b.measure("SDAccelDeepCache interval 3", lambda: dc(base))
        yield b.measure("SDAccelDeepCache interval 3 + SDAccelCompileUNet reduce-overhead", lambda: our_compile(dc(base), "reduce-overhead"))
    if _has("..nodes.lcm"):
        lcm_note = "rel err vs the 20-step euler baseline: another sampler, not comparable"
        for cfg_scale in (1.5, 1.0):  # 1.5: the node's default (UNet batch 2); 1.0 skips the negative pass
            run = _lcm_runner(b, base, cfg_scale)
            eager = f"SDAccelLCMLoRASampler 4 steps, cfg {cfg_scale:g}"
            yield b.measure(eager, lambda: base, steps=LCM_STEPS, run=run, note=lcm_note)
            yield b.measure(eager + " + SDAccelCompileUNet reduce-overhead", ro, steps=LCM_STEPS, run=run, compare_to=eager)
            yield b.measure(eager + " + FP16Cast + SDAccelCompileUNet reduce-overhead", ro_cast, steps=LCM_STEPS, run=run, compare_to=eager)
    # Warm-up: the first compiled run in fresh processes, without and with the compile cache.
    if b.wanted(COLD) or b.wanted(WARM):
        yield from warmup_rows(b.cfg, diagnostics=b.diagnostics, progress=b.progress)
    # Size changes: the target is at most one recompile per change (and none going back).
    side, big = b.preset.latent, b.preset.latent * 3 // 2
    phases = [(f"{side * 8}->{big * 8}", big, 1), (f"back to {side * 8}", side, 1), ("batch 1->2", side, 2)]
    for dyn, label in ((False, "dynamic off"), (None, "dynamic auto")):
        yield b.measure_changes(f"SDAccelCompileUNet reduce-overhead, size changes ({label})",
                                lambda dyn=dyn: our_compile(base, "reduce-overhead", dyn), phases)
    yield b.measure_changes("comfy TorchCompileModel (built-in), size changes", lambda: builtin_compile(base), phases)
    # Experiments (run only when named in --configs): settings on top of the cast + reduce-overhead row.
    yield b.measure("exp: FP16Cast + reduce-overhead + skip-module guards", lambda: our_compile(our_cast(base), "reduce-overhead", guards="skip-module"))
    yield b.measure("exp: FP16Cast + reduce-overhead + cudnn.benchmark", ro_cast, row_ctx=_cudnn_benchmark)
    yield b.measure("exp: FP16Cast + reduce-overhead + conv1x1-as-mm + coordinate descent", ro_cast,
                    compile_ctx=inductor_patch(conv_1x1_as_mm=True, coordinate_descent_tuning=True, epilogue_fusion=False))


def _has(module: str) -> bool:
    """Whether a feature module of this pack is there (features land independently)."""
    import importlib

    try:
        importlib.import_module(module, __package__)
        return True
    except ImportError as e:
        logger.warning("SD Accel bench: %s rows skipped: %s", module.lstrip("."), e)
        return False


def _deepcache(model, interval: int):
    from ...nodes.deepcache import SDAccelDeepCache

    return SDAccelDeepCache().apply(model, cache_interval=interval, cache_depth=0, start_percent=0.0, end_percent=1.0, schedule="uniform")[0]


LCM_STEPS = 4


def _lcm_runner(b: ComfyBench, base, cfg_scale: float = 1.5):
    """`run(model)` for LCM rows: our LCM-LoRA sampler node (hot-swaps a LoRA, lcm sampler, sgm_uniform)
    with a seeded random LoRA of LCM-LoRA's layout over every attention-block projection (speed
    does not depend on the LoRA's values; the final latent is compared between LCM rows only)."""
    import tempfile

    import folder_paths

    from ...nodes.lcm import SDAccelLCMLoRASampler

    if not getattr(b, "_lcm_lora_written", False):  # one file for every LCM row
        folder = tempfile.mkdtemp(prefix="sd_accel_bench_lora_")
        _write_lora(os.path.join(folder, "lcm-bench.safetensors"), base, seed=b.cfg.seed + 1)
        folder_paths.add_model_folder_path("loras", folder)
        b._lcm_lora_written = True
    node, i = SDAccelLCMLoRASampler(), b.inputs

    def run(model):
        latent = node.sample(model, i.positive, i.negative, {"samples": i.latent}, "lcm-bench.safetensors", 1.0, b.cfg.seed,
                             LCM_STEPS, cfg_scale, 1.0)[0]
        return latent["samples"]
    return run


def _write_lora(path: str, model, seed: int, rank: int = 64, std: float = 0.01):
    import comfy.utils

    unet = model.model.diffusion_model
    weights = unet.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        w = weights.get(ldm_key)
        if "attentions" not in diffusers_key or not diffusers_key.endswith(".weight") or w is None or w.dim() != 2:
            continue
        name = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
        sd[f"{name}.lora_down.weight"] = (torch.randn((rank, w.shape[1]), generator=g) * std).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn((w.shape[0], rank), generator=g) * std).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    comfy.utils.save_torch_file(sd, path)


@contextlib.contextmanager
def _cudnn_benchmark():
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


def row_names(cfg: BenchConfig) -> list[str]:
    """Every row `rows` can measure for this preset and device, in order (what --configs is checked against)."""
    if PRESETS[cfg.preset].dit:
        from . import dit_rows

        return dit_rows.row_names(cfg)
    device = cfg.device
    names = [BASELINE, "comfy TorchCompileModel (built-in, inductor)", "SDAccelCompileUNet inductor default"]
    if device != "cuda":
        return names
    ro = "SDAccelCompileUNet reduce-overhead"
    names += ["comfy TorchCompileModel (built-in, cudagraphs)", "SDAccelCompileUNet inductor reduce-overhead",
              "SDAccelFP16Cast channels_last + SDAccelCompileUNet reduce-overhead",
              "SDAccelDeepCache interval 3", "SDAccelDeepCache interval 3 + " + ro]
    for cfg_scale in (1.5, 1.0):
        eager = f"SDAccelLCMLoRASampler 4 steps, cfg {cfg_scale:g}"
        names += [eager, eager + " + " + ro, eager + " + FP16Cast + " + ro]
    names += [COLD, WARM, f"{ro}, size changes (dynamic off)", f"{ro}, size changes (dynamic auto)",
              "comfy TorchCompileModel (built-in), size changes", "exp: FP16Cast + reduce-overhead + skip-module guards",
              "exp: FP16Cast + reduce-overhead + cudnn.benchmark", "exp: FP16Cast + reduce-overhead + conv1x1-as-mm + coordinate descent"]
    return names


class ComfySession:
    """The ComfyUI host, as run_bench drives it: the result header, the rows, the extra JSON fields."""

    def __init__(self, cfg: BenchConfig, progress: Callable[[str], None] | None = None):
        if cfg.checkpoint:
            raise SDAccelError("SD Accel bench --host comfy: --checkpoint is not supported with the ComfyUI host yet; it builds the real "
                               "architecture with seeded random weights. Drop --checkpoint, or use --host diffusers.")
        self.b = b = ComfyBench(cfg, PRESETS[cfg.preset], progress)
        name = torch.cuda.get_device_name() if cfg.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        ver, vram = comfy_version(b.root), "DynamicVRAM on" if b.dynamic_vram else "DynamicVRAM off"
        self.result = BenchResult(cfg.device, name, f"{cfg.preset} (ComfyUI {ver}, {vram}, euler/{b.preset.scheduler}, cfg {cfg.cfg_scale:g})",
                                  b.steps, torch.__version__)
        self.result.batch_note = "CFG batch 2" if cfg.cfg_scale != 1.0 else "CFG 1: one pass"
        self.extra = {"host": "comfy", "comfyui": ver, "dynamic_vram": b.dynamic_vram, "model": b.loaded_as, "diagnostics": b.diagnostics}

    def rows(self):
        for row in rows(self.b):
            if row is not None:
                logger.info("SD Accel bench: %s: %.2f ms/step, %.2fx, rel err %.4f, %s", row.name, row.ms_per_step, row.speedup,
                            row.rel_err, row.note)
                yield row


__all__ = ["ComfySession", "rows", "row_names"]
