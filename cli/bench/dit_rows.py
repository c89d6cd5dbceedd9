"""`sd-accel bench --host comfy --preset flux-1024|qwen-image-1328|zimage-1024|wan-480p|ltx-768x512|<family>-tiny`: the DiT rows.

Ours beside the peers, in one process on one model (dit.py): ComfyUI eager; ComfyUI's
TorchCompileModel; our Compile Model (regional on DiTs: one compiled block per kind, no CUDA graphs
in any mode); FP16 Cast fp8 + Compile, FP16 Cast attention=cudnn + Compile (cuDNN's
attention inside the compiled blocks, where ComfyUI's order puts flash first) and both; our Step Cache (fixed and forecast, interval 3) alone
and on Compile; ComfyUI's EasyCache and LazyCache (its step caches) at their 0.2 threshold; on CUDA,
ComfyUI's own fp8 (Load Diffusion Model's fp8_e4m3fn_fast), alone and with its TorchCompileModel; with
`--wavespeed FOLDER`, WaveSpeed's First Block Cache alone and with its Compile Model+ (last: WaveSpeed
patches torch process-wide when it compiles). LoRA changes on a compiled model, ours (LoRA Hot-Swap)
and ComfyUI's (LoraLoaderModelOnly after TorchCompileModel): the first image after another LoRA and
after another strength, against the steady image, and what dynamo compiled for each.

rel err: one model call for the compile and fp8 rows (a random DiT amplifies rounding over 20
steps, so the final latent says little about a kernel change; it is in the note), the final
latent for the step caches (what a cache changes is the trajectory). On random weights a cache's
error is not its error on a trained model: tests/gpu/judge_caches.py judges them on one.
"""
from __future__ import annotations

import os

from . import dit, peers
from .comfy import BASELINE, ComfyBench, builtin_compile, our_compile
from .measure import BenchConfig

CACHE_INTERVAL = 3
PEER_THRESHOLD = 0.2  # EasyCache / LazyCache's default reuse threshold


def _names(cfg: BenchConfig) -> dict[str, str]:
    be = cfg.dynamo_backend
    mode = "reduce-overhead" if cfg.device == "cuda" else "default"  # the node's default on ComfyUI; no CUDA graphs on the CPU
    tag = "" if be == "inductor" else f" [{be}]"
    ours = f"SDAccelCompileUNet {mode}{tag}"
    n = {"builtin": f"comfy TorchCompileModel (built-in, {be})", "ours": ours}
    if cfg.device == "cuda":
        n["fp8"] = f"SDAccelFP16Cast fp8 + {ours}"
        n["cudnn"] = f"SDAccelFP16Cast attention=cudnn + {ours}"
        n["fp8_cudnn"] = f"SDAccelFP16Cast fp8 attention=cudnn + {ours}"
        n["comfy_fp8"] = "comfy fp8_e4m3fn_fast (Load Diffusion Model weight_dtype)"
        n["comfy_fp8_compile"] = f"comfy fp8_e4m3fn_fast + TorchCompileModel ({be})"
    for m in ("fixed", "forecast"):
        n[f"cache_{m}"] = f"SDAccelStepCache {m} {CACHE_INTERVAL}"
    for m in ("fixed", "forecast"):
        n[f"compile_cache_{m}"] = f"{ours} + SDAccelStepCache {m} {CACHE_INTERVAL}"
    for peer in ("EasyCache", "LazyCache"):
        n[peer] = f"comfy {peer} {PEER_THRESHOLD:g}"
    n["ours_lora"] = f"{ours} + SDAccelLoRAHotSwap, LoRA changes"
    n["builtin_lora"] = f"comfy TorchCompileModel ({be}) + LoraLoaderModelOnly, LoRA changes"
    if cfg.wavespeed:
        n["fbcache"] = f"WaveSpeed FBCache {peers.FBCACHE_THRESHOLD:g}"
        n["fbcache_compile"] = f"WaveSpeed FBCache {peers.FBCACHE_THRESHOLD:g} + Compile Model+ {mode}"
    return n


def row_names(cfg: BenchConfig) -> list[str]:
    return [BASELINE, *_names(cfg).values()]


def rows(b: ComfyBench):
    base, n, be = b.model, _names(b.cfg), b.cfg.dynamo_backend
    mode = "reduce-overhead" if b.device == "cuda" else "default"
    ours = lambda m=None: our_compile(m or base, mode, torch_backend=be)  # noqa: E731
    yield b.measure(BASELINE, lambda: base, rel="call")
    yield b.measure(n["builtin"], lambda: builtin_compile(base, be), rel="call")
    yield b.measure(n["ours"], ours, rel="call")
    if "fp8" in n:
        yield b.measure(n["fp8"], lambda: ours(fp16_cast(base)), rel="call")
        yield b.measure(n["cudnn"], lambda: ours(fp16_cast(base, dtype="auto", attention="cudnn")), rel="call")
        yield b.measure(n["fp8_cudnn"], lambda: ours(fp16_cast(base, attention="cudnn")), rel="call")  # the two levers together
        fp8_file = lambda: peers.comfy_fp8(dit.model_file(b.preset.arch, b.preset.tiny, b.cfg.seed, b.device))  # noqa: E731
        yield b.measure(n["comfy_fp8"], fp8_file, rel="call")
        yield b.measure(n["comfy_fp8_compile"], lambda: builtin_compile(fp8_file(), be), rel="call")
    for m in ("fixed", "forecast"):
        yield b.measure(n[f"cache_{m}"], lambda m=m: step_cache(base, m))
    for m in ("fixed", "forecast"):
        yield b.measure(n[f"compile_cache_{m}"], lambda m=m: step_cache(ours(), m))
    for peer in ("EasyCache", "LazyCache"):
        yield b.measure(n[peer], lambda peer=peer: comfy_cache(base, peer, PEER_THRESHOLD))
    yield b.measure_changes(n["ours_lora"], *lora_changes(b, ours, hotswap))
    yield b.measure_changes(n["builtin_lora"], *lora_changes(b, lambda: builtin_compile(base, be), lora_loader))
    if "fbcache" in n:
        ws = b.cfg.wavespeed
        yield b.measure(n["fbcache"], lambda: peers.wavespeed_fbcache(base, ws))
        yield b.measure(n["fbcache_compile"], lambda: peers.wavespeed_compile(peers.wavespeed_fbcache(base, ws), ws, mode, be))


def fp16_cast(model, dtype: str = "fp8", attention: str = "auto"):
    """FP16 Cast as the graph would run it: fp8 linears by default; dtype "auto" keeps the model's (attention choice only)."""
    from ...nodes.cast import SDAccelFP16Cast

    return SDAccelFP16Cast().apply(model, dtype=dtype, channels_last=False, attention=attention)[0]


def step_cache(model, mode: str, interval: int = CACHE_INTERVAL):
    """Our Step Cache node at its defaults but `mode` and `interval`, as the graph would run it."""
    from ...nodes.stepcache import SDAccelStepCache

    node = SDAccelStepCache()
    kw = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items() if k != "model"}
    kw.update(mode=mode, interval=interval)
    return node.apply(model, **kw)[0]


def lora_changes(b: ComfyBench, compiled, apply):
    """`make` and the phases of a LoRA-changes row: `apply(model, lora, strength)` on the compiled model
    again, as ComfyUI reruns a LoRA node whose widget changed (its input, the compiled model, is cached)."""
    held = {}

    def make():
        held["loras"], held["compiled"] = _bench_loras(b), compiled()
        return apply(held["compiled"], held["loras"][0], 1.0)

    def change(strength: float):
        return lambda _m: apply(held["compiled"], held["loras"][1], strength)
    return make, [("another LoRA", change(1.0)), ("strength 0.5", change(0.5))]


def _bench_loras(b: ComfyBench) -> tuple[str, str]:
    """Two seeded random LoRAs for the preset's model, written once per bench into a temp folder ComfyUI lists."""
    import tempfile

    import folder_paths

    if not getattr(b, "_dit_loras", None):
        folder, path = tempfile.mkdtemp(prefix="sd_accel_bench_lora_"), dit.model_file(b.preset.arch, b.preset.tiny, b.cfg.seed, b.device)
        b._dit_loras = tuple(os.path.basename(dit.lora_file(path, folder, f"sd_accel_bench_lora_{i}.safetensors", b.cfg.seed + 1 + i))
                             for i in range(2))
        folder_paths.add_model_folder_path("loras", folder)
    return b._dit_loras


def hotswap(model, lora: str, strength: float):
    from ...nodes.lora import SDAccelLoRAHotSwap

    return SDAccelLoRAHotSwap().apply(model, lora, strength)[0]


def lora_loader(model, lora: str, strength: float):
    """ComfyUI's LoraLoaderModelOnly, as the graph runs it."""
    import nodes

    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, strength)[0]


def comfy_cache(model, kind: str, threshold: float):
    """ComfyUI's EasyCache or LazyCache node (comfy_extras/nodes_easycache.py) at its default start/end."""
    import comfy_extras.nodes_easycache as ec

    cls = ec.EasyCacheNode if kind == "EasyCache" else ec.LazyCacheNode
    out = cls.execute(model, threshold, 0.15, 0.95, False)
    return out.result[0] if hasattr(out, "result") else out[0]


__all__ = ["rows", "row_names", "fp16_cast", "step_cache", "comfy_cache", "lora_changes", "hotswap", "lora_loader"]
