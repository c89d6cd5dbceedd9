"""stable-diffusion-webui (AUTOMATIC1111) and Forge: the public face the extension's scripts import.

The scripts (`scripts/sd_accel_*.py`) hold the UI. What they use lives in small modules,
re-exported here: options and parsing (`webui_options`), infotext (`webui_infotext`), what is
available and what was applied (`webui_status`), LoRA files (`webui_lora`), and the installers:
`webui_a1111` (instance `forward` on the UNet for one generation) and `webui_forge`
(`model_function_wrapper` on a clone of Forge's UNet patcher), with `webui_hosts` choosing
between them and ending a generation on either; both run `webui_runner`.

Compiled callables and cast copies are kept in accel_core's registry (`webui_cache`);
DeepCache runs the core's walk and runner with the A1111 / Forge hooks of `webui_deepcache`.
"""
from __future__ import annotations

from ..casting import ATTENTION  # noqa: F401  (re-exported for the scripts)
from ..compiling import MODES  # noqa: F401  (re-exported)
from ..errors import SDAccelError
from .webui_cache import cache_state, cast_copy_for, clear_caches, compiled_for
from .webui_deepcache import deepcache_paths
from .webui_hosts import A1111, a1111_unet, apply_forge, finish_generation, is_forge
from .webui_infotext import K_CAST, K_COMPILE, K_DEEPCACHE, K_LCM, K_LORA, K_STATUS, SETTING_KEYS, from_infotext, infotext_field, to_infotext
from .webui_lora import fuse_loras, lora_files, lora_specs, restore_loras
from .webui_options import (BACKEND_CHOICES, DTYPE_CHOICES, NO_LORA, OFF, SETTINGS_FIELDS, UI_FIELDS, WebuiOptions, format_loras,
                            options_from_args, parse_loras, with_overrides)
from .webui_status import FEATURES, Applied, backend_table, feature_module, feature_status, last_applied

__all__ = ["WebuiOptions", "UI_FIELDS", "SETTINGS_FIELDS", "BACKEND_CHOICES", "DTYPE_CHOICES", "OFF", "NO_LORA", "ATTENTION", "MODES",
           "SDAccelError", "parse_loras", "format_loras", "options_from_args", "with_overrides",
           "K_COMPILE", "K_CAST", "K_DEEPCACHE", "K_LCM", "K_LORA", "K_STATUS", "SETTING_KEYS", "to_infotext", "from_infotext", "infotext_field",
           "FEATURES", "feature_module", "feature_status", "Applied", "last_applied", "backend_table",
           "lora_files", "lora_specs", "fuse_loras", "restore_loras",
           "A1111", "a1111_unet", "apply_forge", "finish_generation", "is_forge",
           "compiled_for", "cast_copy_for", "clear_caches", "cache_state", "deepcache_paths"]
