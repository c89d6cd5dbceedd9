"""LoRA files: read a .safetensors LoRA into per-layer (up, down, alpha, mid) factors.

Formats: kohya / A1111 (`lora_unet_<name>.lora_up/lora_down/alpha`, LDM or diffusers module
names), diffusers / PEFT (`<name>.lora_A/lora_B`, optional `unet.`, `transformer.`,
`diffusion_model.` or `base_model.model.` prefix), the older diffusers attention-processor format
(`...processor.to_q_lora.up`), XLabs (`...processor.qkv_lora1.down/up`), LoCon convolutions
(including `lora_mid`), and the full-tensor differences ComfyUI loads beside them (`.diff`,
`.diff_b` for the bias, LyCORIS `.w_norm/.b_norm`; lightx2v's Wan LoRAs carry them). Which
module a name means is for `lora_names` to say. Text-encoder keys are counted and skipped. A
file is read once per (path, size, mtime).
"""
from __future__ import annotations

import collections
import functools
import os
from dataclasses import dataclass, field

import torch

from .errors import SDAccelError

# (up suffix, down suffix) pairs in the formats users have; the first that matches a key wins.
KEY_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),  # kohya / A1111 / LyCORIS LoCon
    (".lora_B.weight", ".lora_A.weight"),  # PEFT / diffusers
    (".lora_B.default.weight", ".lora_A.default.weight"),  # PEFT state dict saved with the adapter name
    ("_lora.up.weight", "_lora.down.weight"),  # old diffusers attention processors
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".up.weight", ".down.weight"),  # XLabs Flux LoRAs (`...processor.qkv_lora1.up.weight`)
)
# Full-tensor differences: suffix -> whether it is added to the module's bias (else its weight).
_DIFFS = {".diff": False, ".diff_b": True, ".w_norm": False, ".b_norm": True}
_MID = ".lora_mid.weight"
ALPHA_SUFFIX = ".alpha"
_DORA = (".dora_scale", ".lora_magnitude_vector")
_OTHER_ADAPTERS = {"hada_w": "LoHa", "lokr_w": "LoKr", "oft_": "OFT", ".set_weight": "weight replacement", "a1.weight": "GLoRA"}
UNET_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_", "base_model.model.", "unet.", "transformer.",
                  "model.diffusion_model.", "diffusion_model.")
_TE_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te_text_model", "te1_", "te2_", "lycoris_te")


# --- files -------------------------------------------------------------------------------------

@dataclass
class LoraLayer:
    """One low-rank pair from a file. delta = scale * up @ (mid) @ down."""

    base: str
    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else 1.0

    def factors(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as 2-D matrices on `device` in `dtype`, LoCon's mid folded into down: delta = scale * up @ down.

        Kept after the first use: ComfyUI applies per run, and converting and moving hundreds
        of small tensors again on every swap would dominate the swap time."""
        key = (torch.device(device), dtype)
        cached = self.__dict__.get("_dev")
        if cached is None or cached[0] != key:
            up, down = self.up.to(*key), self.down.to(*key)
            if self.mid is not None:  # LoCon Tucker: fold mid into down, as ComfyUI/LyCORIS do
                mid = self.mid.to(*key)
                final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)).reshape(final).transpose(0, 1)
            cached = (key, up.flatten(1), down.flatten(1).contiguous())
            self.__dict__["_dev"] = cached
        return cached[1], cached[2]

    def delta(self, shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor:
        up, down = self.factors(device, dtype)
        return (up @ down).reshape(shape) * self.scale

    def add_to(self, acc: torch.Tensor, strength: float) -> torch.Tensor:
        """acc (the weight in the compute dtype, contiguous) += strength * delta, in one fused kernel."""
        up, down = self.factors(acc.device, acc.dtype)
        acc.view(acc.shape[0], -1).addmm_(up, down, alpha=strength * self.scale)
        return acc


@dataclass
class DiffLayer:
    """A full-tensor difference from a file (`.diff`, `.diff_b`): delta = diff."""

    base: str
    diff: torch.Tensor
    bias: bool = False  # added to the module's bias, not its weight

    def delta(self, shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor:
        return self.diff.to(device, dtype).reshape(shape)

    def add_to(self, acc: torch.Tensor, strength: float) -> torch.Tensor:
        return acc.add_(self.diff.to(acc.device, acc.dtype).reshape(acc.shape), alpha=strength)


def add_patch(layer, acc: torch.Tensor, strength: float, offset=None) -> None:
    """acc += strength * the layer's delta, into the slice `offset` names.

    offset: None (the whole tensor), (dim, start, size) (a slice of a fused tensor: ComfyUI's
    Flux q/k/v in one qkv weight), or "swap_halves" (diffusers' norm_out keeps (scale, shift)
    where ComfyUI's final_layer keeps (shift, scale)).
    """
    if offset is None:
        layer.add_to(acc, strength)
    elif offset == "swap_halves":
        d = layer.delta(acc.shape, acc.device, acc.dtype)
        a, b = d.chunk(2, dim=0)
        acc.add_(torch.cat((b, a), dim=0), alpha=strength)
    else:
        dim, start, size = offset
        part = acc.narrow(dim, start, size)
        if dim == 0 and isinstance(layer, LoraLayer):
            layer.add_to(part, strength)  # rows of a contiguous tensor: contiguous, one addmm_
        else:
            part.add_(layer.delta(part.shape, acc.device, acc.dtype), alpha=strength)


def move_factors(layers, device, dtype=torch.float32) -> None:
    """Bring many layers' factors to `device` with one host-to-device copy per source dtype."""
    device = torch.device(device)
    todo = [l for l in layers if isinstance(l, LoraLayer) and l.__dict__.get("_dev", (None,))[0] != (device, dtype)]
    if device.type == "cpu" or not todo:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for l in todo:
        for t in (l.up, l.down, l.mid):
            if t is not None:
                by_dtype.setdefault(t.dtype, []).append(t)
    moved: dict[int, torch.Tensor] = {}
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts]).to(device)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            moved[id(t)] = part.view(t.shape)
    for l in todo:  # converted and folded on the device, where the copies already are
        on = LoraLayer(l.base, moved[id(l.up)], moved[id(l.down)], None if l.mid is None else moved[id(l.mid)], l.alpha)
        l.__dict__["_dev"] = ((device, dtype),) + on.factors(device, dtype)


@dataclass
class LoraFile:
    path: str
    key: tuple  # (real path, mtime, size): identity of the file's contents
    layers: dict[str, LoraLayer | DiffLayer]  # diffs keyed by their full key (`<base>.diff_b`)
    text_encoder_keys: int = 0
    unused: dict[str, int] = field(default_factory=dict)  # kind -> key count
    metadata: dict[str, str] = field(default_factory=dict)  # the file's safetensors metadata (an IC-LoRA's reference_downscale_factor)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def read_lora(path: str) -> LoraFile:
    """Parse a LoRA .safetensors file (cached by path, mtime and size)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise SDAccelError(f"SD Accel LoRA: file {str(path)!r} does not exist. Expected the path of a LoRA .safetensors file "
                           "(in ComfyUI: a file in models/loras).")
    return _read_cached(_file_key(str(path)), str(path))


@functools.lru_cache(maxsize=8)
def _read_cached(key: tuple, path: str) -> LoraFile:
    from .checkpoint import read_safetensors, read_safetensors_metadata

    lf = parse_lora(read_safetensors(path, "LoRA"), path, key)
    lf.metadata = read_safetensors_metadata(path)
    return lf


def parse_lora(sd: dict[str, torch.Tensor], path: str = "<state dict>", key: tuple | None = None) -> LoraFile:
    """Group a LoRA state dict into layers; count text-encoder and unsupported keys."""
    used: set[str] = set()
    layers: dict[str, LoraLayer | DiffLayer] = {}
    for k in sd:
        for up_s, down_s in KEY_PAIRS:
            if k.endswith(up_s):
                base = k[: -len(up_s)]
                down_k = base + down_s
                if down_k not in sd:
                    break
                alpha = sd.get(base + ALPHA_SUFFIX)
                mid = sd.get(base + _MID)
                layers[base] = LoraLayer(base, sd[k], sd[down_k], mid, float(alpha.float()) if alpha is not None else None)
                used.update(x for x in (k, down_k, base + ALPHA_SUFFIX, base + _MID) if x in sd)
                break
        for suffix, bias in _DIFFS.items():
            if k.endswith(suffix):
                layers[k] = DiffLayer(k[: -len(suffix)], sd[k], bias)
                used.add(k)
    te = [b for b in layers if b.startswith(_TE_PREFIXES)]
    for b in te:
        del layers[b]
    unused: dict[str, int] = collections.Counter()
    for k in sd:
        if k in used:
            continue
        if k.startswith(_TE_PREFIXES):
            continue
        kind = next((v for s, v in _OTHER_ADAPTERS.items() if s in k), None)
        if kind is None and any(d in k for d in _DORA):
            kind = "DoRA"
        unused[kind or "unknown"] += 1
    te_keys = sum(1 for k in sd if k.startswith(_TE_PREFIXES))
    lf = LoraFile(path, key or (path,), layers, te_keys, dict(unused))
    if unused.get("DoRA"):
        raise SDAccelError(f"SD Accel LoRA: {lf.name} is a DoRA ({unused['DoRA']} magnitude keys). Hot-swap fuses plain LoRA/LoCon "
                           "deltas only, because DoRA's normalisation cannot be stacked and removed exactly. Use ComfyUI's "
                           "LoraLoaderModelOnly for this file.")
    if not layers:
        found = ", ".join(f"{n} {k}" for k, n in unused.items()) or "none"
        sample = ", ".join(list(sd)[:3])
        raise SDAccelError(f"SD Accel LoRA: {lf.name} holds no LoRA layers for the diffusion model (expected key pairs like "
                           f"'lora_unet_..lora_up.weight/lora_down.weight' or '..lora_A.weight/lora_B.weight'; found {len(sd)} keys: "
                           f"{te_keys} text-encoder, other kinds: {found}; e.g. {sample}). LoHa/LoKr/OFT files need ComfyUI's LoraLoader.")
    return lf
