"""Infotext for the webui: what each image records about SD Accel, and reading it back ("Send to", paste)."""
from __future__ import annotations

import functools

from ...errors import SDAccelError
from ...log import logger
from .accordion import format_loras, format_num, parse_loras
from .options import UI_OPTIONS, WebuiOptions

# One key per feature, only for features that are on, so images made without SD Accel carry nothing.
K_COMPILE, K_CAST, K_DEEPCACHE, K_STEPCACHE, K_LCM, K_LORA, K_STATUS = (
    "SD Accel compile", "SD Accel cast", "SD Accel DeepCache", "SD Accel Step Cache", "SD Accel LCM-LoRA", "SD Accel LoRA", "SD Accel status")
SETTING_KEYS = (K_COMPILE, K_CAST, K_DEEPCACHE, K_STEPCACHE, K_LCM, K_LORA)


# The cache entries' `key=value` words and the options they hold. DeepCache's are what SD Accel has
# always written; on a DiT model the same controls ran the Step Cache, recorded under its own key
# (the threshold only where the mode reads it).
DEEPCACHE_WORDS = {"interval": "deepcache_interval", "depth": "deepcache_depth", "start": "deepcache_start", "end": "deepcache_end"}
STEPCACHE_WORDS = {"mode": "stepcache_mode", "interval": "deepcache_interval", "front": "stepcache_front", "back": "stepcache_back",
                   "threshold": "stepcache_threshold", "start": "deepcache_start", "end": "deepcache_end"}


def to_infotext(opts: WebuiOptions, dit: bool = False) -> dict[str, str]:
    """The infotext entries recording `opts` (what `from_infotext` reads back); `dit`: the model is a DiT (the cache is the Step Cache)."""
    out = {}
    if opts.compile_on:
        out[K_COMPILE] = f"{opts.backend} {opts.mode}"
    if opts.cast_on or opts.attention_on:
        parts = [opts.dtype] + (["channels_last"] if opts.channels_last else []) + [f"attention={opts.attention}"]
        out[K_CAST] = " ".join(parts)
    if opts.deepcache_on:
        words = {w: n for w, n in STEPCACHE_WORDS.items() if w != "threshold" or opts.stepcache_mode == "adaptive"} if dit else DEEPCACHE_WORDS
        out[K_STEPCACHE if dit else K_DEEPCACHE] = " ".join(f"{word}={_format(getattr(opts, name))}" for word, name in words.items())
    if opts.lcm_on:
        out[K_LCM] = f"{opts.lcm_lora}:{format_num(opts.lcm_strength)}"
    if opts.loras_on:
        out[K_LORA] = format_loras(opts.loras)
    return out


def _format(value) -> str:
    return str(value) if isinstance(value, (int, str)) else format_num(value)


def _kv(text: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in str(text).split() if "=" in tok)


def _parse(name: str, text: str):
    """One recorded value, read as its option's kind; the declared default where the entry leaves it out."""
    kind = UI_OPTIONS[name].kind
    return int(text) if kind == "INT" else float(text) if kind == "FLOAT" else text


def from_infotext(params: dict) -> WebuiOptions:
    """Options recorded in an image's parsed infotext (the dict the webui's parser returns).

    Features without a key are off, so pasting an image made without SD Accel switches it off.
    Raises SDAccelError for a value SD Accel did not write.
    """
    values: dict = {"enabled": any(k in params for k in SETTING_KEYS)}
    try:
        if K_COMPILE in params:
            backend, _, mode = str(params[K_COMPILE]).strip().partition(" ")
            values.update(backend=backend, mode=mode.strip() or UI_OPTIONS["mode"].default)
        if K_CAST in params:
            toks = str(params[K_CAST]).split()
            values.update(dtype=toks[0], channels_last="channels_last" in toks, attention=_kv(params[K_CAST]).get("attention", UI_OPTIONS["attention"].default))
        for key, words in ((K_DEEPCACHE, DEEPCACHE_WORDS), (K_STEPCACHE, STEPCACHE_WORDS)):
            if key in params:
                kv = _kv(params[key])
                kv["interval"]  # the one word every cache entry has
                values.update({name: _parse(name, kv[word]) for word, name in words.items() if word in kv})
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


__all__ = ["DEEPCACHE_WORDS", "STEPCACHE_WORDS", "K_COMPILE", "K_CAST", "K_DEEPCACHE", "K_STEPCACHE", "K_LCM", "K_LORA", "K_STATUS", "SETTING_KEYS", "to_infotext", "from_infotext", "infotext_field"]
