"""stable-diffusion-webui (AUTOMATIC1111) and Forge: the public face the extension's scripts import.

The scripts (`scripts/sd_accel_*.py`) hold the gradio UI. What they use lives in this package,
re-exported here: the options (`options`: each field a core option as the webui shows it, and
the plan of core configs built from them), what the accordion sends (`accordion`), infotext
(`infotext`), what is available and what was applied (`status`), LoRA files (`lora`), and the
installers: `a1111` (instance `forward` on the UNet for one generation) and `forge` (a
`model_function_wrapper`, `forge_wrapper`, on a clone of Forge's UNet patcher); both run
`runner`. `session.Session` owns the state of a webui process; the one SESSION is made here.

Cast copies are kept in accel_core's registry (`cache`); DeepCache runs the core's walk and
runner with the A1111 / Forge hooks of `deepcache`; on Forge Neo's DiT models the same cache
controls run the core's Step Cache (`stepcache`, through `forge_dit`).
"""
from __future__ import annotations

from ...casting import ATTENTION  # noqa: F401  (re-exported for the scripts)
from ...compiling import MODES  # noqa: F401  (re-exported)
from ...errors import SDAccelError
from ...registry import compiled_for
from .cache import cache_state, cast_copy_for, clear_caches
from .deepcache import deepcache_paths
from .session import Session, a1111_unet, diffusion_model, is_dit, is_forge, takes_lcm
from .infotext import K_CAST, K_COMPILE, K_DEEPCACHE, K_LCM, K_LORA, K_STATUS, K_STEPCACHE, SETTING_KEYS, from_infotext, infotext_field, to_infotext
from .lora import FusedLoras, lora_files, lora_specs
from .accordion import format_loras, options_from_args, parse_loras, with_overrides
from .options import BACKEND_CHOICES, DTYPE_CHOICES, NO_LORA, OFF, SETTINGS_FIELDS, UI_FIELDS, UI_OPTIONS, Plan, WebuiOptions
from .status import FEATURES, Applied, backend_table, feature_module, feature_status

# SD Accel's state in this webui process (the A1111 swap, Forge passes, fused LoRAs, the last
# generation's report), owned by the extension; the scripts reach it through these names.
SESSION = Session()
A1111 = SESSION.a1111
apply_forge, finish_generation, last_applied = SESSION.apply_forge, SESSION.finish_generation, SESSION.last_applied

__all__ = ["WebuiOptions", "Plan", "UI_FIELDS", "UI_OPTIONS", "SETTINGS_FIELDS", "BACKEND_CHOICES", "DTYPE_CHOICES", "OFF", "NO_LORA", "ATTENTION", "MODES",
           "SDAccelError", "parse_loras", "format_loras", "options_from_args", "with_overrides",
           "K_COMPILE", "K_CAST", "K_DEEPCACHE", "K_STEPCACHE", "K_LCM", "K_LORA", "K_STATUS", "SETTING_KEYS", "to_infotext", "from_infotext", "infotext_field",
           "FEATURES", "feature_module", "feature_status", "Applied", "last_applied", "backend_table",
           "lora_files", "lora_specs", "FusedLoras",
           "Session", "SESSION", "A1111", "a1111_unet", "apply_forge", "finish_generation", "is_forge", "is_dit", "diffusion_model", "takes_lcm",
           "compiled_for", "cast_copy_for", "clear_caches", "cache_state", "deepcache_paths"]
