"""Infotext for the webui: what each image records about SD Accel, and reading it back ("Send to", paste)."""
from __future__ import annotations

import functools

from ..errors import SDAccelError
from ..log import logger
from .webui_options import WebuiOptions, format_num, format_loras, parse_loras

# One key per feature, only for features that are on, so images made without SD Accel carry nothing.
K_COMPILE, K_CAST, K_DEEPCACHE, K_LCM, K_LORA, K_STATUS = (
    "SD Accel compile", "SD Accel cast", "SD Accel DeepCache", "SD Accel LCM-LoRA", "SD Accel LoRA", "SD Accel status")
SETTING_KEYS = (K_COMPILE, K_CAST, K_DEEPCACHE, K_LCM, K_LORA)


def to_infotext(opts: WebuiOptions) -> dict[str, str]:
    """The infotext entries recording `opts` (what `from_infotext` reads back)."""
    out = {}
    if opts.compile_on:
        out[K_COMPILE] = f"{opts.backend} {opts.mode}"
    if opts.cast_on or opts.attention_on:
        parts = [opts.dtype] + (["channels_last"] if opts.channels_last else []) + [f"attention={opts.attention}"]
        out[K_CAST] = " ".join(parts)
    if opts.deepcache_on:
        out[K_DEEPCACHE] = f"interval={opts.deepcache_interval} depth={opts.deepcache_depth} start={format_num(opts.deepcache_start)} end={format_num(opts.deepcache_end)}"
    if opts.lcm_on:
        out[K_LCM] = f"{opts.lcm_lora}:{format_num(opts.lcm_strength)}"
    if opts.loras_on:
        out[K_LORA] = format_loras(opts.loras)
    return out


def _kv(text: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in str(text).split() if "=" in tok)


def from_infotext(params: dict) -> WebuiOptions:
    """Options recorded in an image's parsed infotext (the dict the webui's parser returns).

    Features without a key are off, so pasting an image made without SD Accel switches it off.
    Raises SDAccelError for a value SD Accel did not write.
    """
    values: dict = {"enabled": any(k in params for k in SETTING_KEYS)}
    try:
        if K_COMPILE in params:
            backend, _, mode = str(params[K_COMPILE]).strip().partition(" ")
            values.update(backend=backend, mode=mode.strip() or "default")
        if K_CAST in params:
            toks = str(params[K_CAST]).split()
            values.update(dtype=toks[0], channels_last="channels_last" in toks, attention=_kv(params[K_CAST]).get("attention", "auto"))
        if K_DEEPCACHE in params:
            kv = _kv(params[K_DEEPCACHE])
            values.update(deepcache_interval=int(kv["interval"]), deepcache_depth=int(kv.get("depth", 1)),
                          deepcache_start=float(kv.get("start", 0)), deepcache_end=float(kv.get("end", 1)))
        if K_LCM in params:
            ((name, strength),) = parse_loras(str(params[K_LCM]))
            values.update(lcm_lora=name, lcm_strength=strength)
        if K_LORA in params:
            values["loras"] = parse_loras(str(params[K_LORA]))
    except SDAccelError:
        raise
    except (KeyError, ValueError, IndexError) as e:
        raise SDAccelError(f"SD Accel: could not read the SD Accel entries of this infotext ({type(e).__name__}: {e}); "
                           f"expected what SD Accel writes, e.g. '{K_COMPILE}: inductor default'.") from e
    return WebuiOptions(**values)


@functools.lru_cache(maxsize=None)
def infotext_field(name: str):
    """A paste function for one accordion component: params -> its value (None leaves it as is).

    One function object per field (cached), so the txt2img and img2img entries match for "Send to".
    """
    def read(params: dict):
        try:
            opts = from_infotext(params)
        except SDAccelError as e:
            logger.warning("%s", e)
            return None
        value = getattr(opts, name)
        return format_loras(value) if name == "loras" else value
    read.__name__ = f"sd_accel_paste_{name}"
    return read


__all__ = ["K_COMPILE", "K_CAST", "K_DEEPCACHE", "K_LCM", "K_LORA", "K_STATUS", "SETTING_KEYS", "to_infotext", "from_infotext", "infotext_field"]
