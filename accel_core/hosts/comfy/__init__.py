"""ComfyUI: the host adapter the nodes (`nodes/*.py`) call. Patches ModelPatcher clones with keyed
wrappers, callbacks and attachments, never the incoming model; imports ComfyUI only inside functions.

One module per feature, each with its public verb: `compile` (apply_compile; `regional` for DiT
families), `cast` (apply_cast; `attention` its kernel choice), `deepcache` (apply_deepcache;
`deepcache_walk` ComfyUI's block calls), `stepcache` (apply_step_cache), `lora` (apply_hotswap;
`lora_set` and `lora_owner` who holds the fused set and when it goes), `lcm` (lcm_sample).
Shared by all: `model` (check_model, patchable_clone, DynamicVRAM's classic copies), `memory`
(does a regular copy fit), `native` (ComfyUI's own CUDA graphs / compiler), and the status
events for the browser tab (`events`, with `tracking`: which nodes built the sampled model).

Compile UNet and the MODEL checks are re-exported here, as callers have used them from `hosts.comfy`.
"""
from __future__ import annotations

from .compile import COMPILE_KEY, active_compile_config, apply_compile, compile_report, compiled_for
from .model import CLASSIC_COPIES, ClassicCopies, callbacks_mp, check_model, is_dynamic, patchable_clone, wrappers_mp

__all__ = ["COMPILE_KEY", "apply_compile", "compile_report", "active_compile_config", "compiled_for",
           "check_model", "wrappers_mp", "callbacks_mp", "is_dynamic", "patchable_clone", "ClassicCopies", "CLASSIC_COPIES"]
