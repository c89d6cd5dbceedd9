"""LoRA hot-swap: fuse LoRAs into a UNet's weights in place, swap and remove them exactly.

`apply_loras(unet, [LoraSpec(path, strength), ...])` brings the UNet to exactly that set of
LoRAs. Deltas are fused into the existing weight tensors (`param.data.copy_`), so a compiled
graph, CUDA graph or other backend that captured the parameters sees the new weights with
no recompilation. Before a weight is first changed, an exact copy of it is kept; every later
state of that weight is computed from the copy (`original + sum(strength * delta)`), so
swapping A for B, changing a strength or removing one LoRA never drifts, and removing all
of them restores the original bits.

Files: kohya / A1111 (`lora_unet_<name>.lora_up/lora_down/alpha`, with LDM or diffusers
module names), diffusers / PEFT (`<name>.lora_A/lora_B`, optional `unet.` or
`base_model.model.` prefix), the older diffusers attention-processor format
(`...processor.to_q_lora.up`), LoCon convolutions (including `lora_mid`). The host's UNet may
be the LDM `UNetModel` (ComfyUI, A1111/Forge) or diffusers' `UNet2DConditionModel`, SD1.x or
SDXL: the diffusers <-> LDM name table is derived from the module's own block structure, so
it follows whatever the host built. Text-encoder keys are skipped (counted in the report).
"""
from __future__ import annotations

import collections
import functools
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SDAccelError, check_range, choice_error
from .log import logger
from .unet import DIFFUSERS, LDM, unet_kind

BACKUP_DEVICES = ("same", "cpu")

# (up suffix, down suffix) pairs in the formats users have; the first that matches a key wins.
_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),  # kohya / A1111 / LyCORIS LoCon
    (".lora_B.weight", ".lora_A.weight"),  # PEFT / diffusers
    (".lora_B.default.weight", ".lora_A.default.weight"),  # PEFT state dict saved with the adapter name
    ("_lora.up.weight", "_lora.down.weight"),  # old diffusers attention processors
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
_MID = ".lora_mid.weight"
_ALPHA = ".alpha"
_DORA = (".dora_scale", ".lora_magnitude_vector")
_OTHER_ADAPTERS = {"hada_w": "LoHa", "lokr_w": "LoKr", "oft_": "OFT", ".diff": "full weight diff", "a1.weight": "GLoRA"}
_UNET_PREFIXES = ("lora_unet_", "lycoris_", "base_model.model.", "unet.", "model.diffusion_model.", "diffusion_model.")
_TE_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te_text_model", "te1_", "te2_", "lycoris_te")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a .safetensors file and its strength (0 = not applied)."""

    path: str
    strength: float = 1.0

    def __post_init__(self):
        check_range("LoRA", f"the strength of {self.path!r}", self.strength, -100.0, 100.0, "Use 1.0 for the LoRA as trained, 0 to leave it out.")


@dataclass(frozen=True)
class LoraConfig:
    """Args:
        backup_device: where the exact copies of changed weights are kept: "same" (the
            weight's device: fastest swaps) or "cpu" (saves GPU memory; swaps pay a copy).
        min_match: the fraction of a file's UNet layers that must exist in the model with
            the right shapes; below it the file is taken to be for another architecture and
            nothing is changed.
    """

    backup_device: str = "same"
    min_match: float = 0.5

    def __post_init__(self):
        if self.backup_device not in BACKUP_DEVICES:
            raise choice_error("backup device", self.backup_device, BACKUP_DEVICES)
        check_range("LoRA", "min_match", self.min_match, 0.0, 1.0, "Use 0.5 (half the file's UNet layers must fit the model).", lo_open=True)


@dataclass
class LoraReport:
    applied: list[tuple[str, float, int]]  # (file name, strength, layers)
    layers_changed: int
    seconds: float
    changed: bool

    def summary(self) -> str:
        if not self.applied:
            what = "no LoRA (original weights)"
        else:
            what = ", ".join(f"{name} @ {s:g} ({n} layers)" for name, s, n in self.applied)
        if not self.changed:
            return f"{what}: already applied"
        return f"{what}: {self.layers_changed} weights updated in place in {self.seconds * 1000:.0f} ms"


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

    def _on(self, device) -> tuple:
        # Factors stay on the weight's device after the first use: ComfyUI applies per run, and
        # host-to-device copies of hundreds of small tensors would dominate the swap time.
        device = torch.device(device)
        cached = self.__dict__.get("_dev")
        if cached is None or cached[0] != device:
            cached = (device, self.up.to(device), self.down.to(device), None if self.mid is None else self.mid.to(device))
            self.__dict__["_dev"] = cached
        return cached[1:]

    def delta(self, shape: torch.Size, device, dtype=torch.float32) -> torch.Tensor:
        up, down, mid = self._on(device)
        up, down = up.to(dtype), down.to(dtype)
        if mid is not None:  # LoCon Tucker: fold mid into down, as ComfyUI/LyCORIS do
            mid = mid.to(dtype)
            final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)).reshape(final).transpose(0, 1)
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * self.scale


@dataclass
class LoraFile:
    path: str
    key: tuple  # (real path, mtime, size): identity of the file's contents
    layers: dict[str, LoraLayer]
    text_encoder_keys: int = 0
    unused: dict[str, int] = field(default_factory=dict)  # kind -> key count

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
    from .checkpoint import read_safetensors

    return parse_lora(read_safetensors(path, "LoRA"), path, key)


def parse_lora(sd: dict[str, torch.Tensor], path: str = "<state dict>", key: tuple | None = None) -> LoraFile:
    """Group a LoRA state dict into layers; count text-encoder and unsupported keys."""
    used: set[str] = set()
    layers: dict[str, LoraLayer] = {}
    for k in sd:
        for up_s, down_s in _PAIRS:
            if k.endswith(up_s):
                base = k[: -len(up_s)]
                down_k = base + down_s
                if down_k not in sd:
                    break
                alpha = sd.get(base + _ALPHA)
                mid = sd.get(base + _MID)
                layers[base] = LoraLayer(base, sd[k], sd[down_k], mid, float(alpha.float()) if alpha is not None else None)
                used.update(x for x in (k, down_k, base + _ALPHA, base + _MID) if x in sd)
                break
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
        raise SDAccelError(f"SD Accel LoRA: {lf.name} holds no UNet LoRA layers (expected key pairs like "
                           f"'lora_unet_..lora_up.weight/lora_down.weight' or '..lora_A.weight/lora_B.weight'; found {len(sd)} keys: "
                           f"{te_keys} text-encoder, other kinds: {found}; e.g. {sample}). LoHa/LoKr/OFT files need ComfyUI's LoraLoader.")
    return lf


# --- UNet names: LDM <-> diffusers -------------------------------------------------------------

_RES_SUB = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_SUB = {"res": _RES_SUB, "down": {"op": "conv"}, "up": {"conv": "conv"}}
_BASIC = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
          "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
          "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_BASIC_ALT = {"label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2"}  # SD2 unCLIP names


def _is_res(m):
    return hasattr(m, "in_layers") and hasattr(m, "out_layers")


def _is_attn(m):
    return hasattr(m, "transformer_blocks")


def _is_down(m):
    return hasattr(m, "op") and not _is_res(m)


def _is_up(m):
    return "upsample" in type(m).__name__.lower() and hasattr(m, "conv")


def _block_pairs_ldm(unet) -> list[tuple[str, str, str]]:
    pairs = []
    level = i = 0
    for n in range(1, len(unet.input_blocks)):
        block = unet.input_blocks[n]
        if _is_down(block[0]):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", "down"))
            level, i = level + 1, 0
            continue
        for c, child in enumerate(block):
            if _is_res(child):
                pairs.append((f"input_blocks.{n}.{c}", f"down_blocks.{level}.resnets.{i}", "res"))
            elif _is_attn(child):
                pairs.append((f"input_blocks.{n}.{c}", f"down_blocks.{level}.attentions.{i}", "attn"))
        i += 1
    r = 0
    for c, child in enumerate(unet.middle_block or []):
        if _is_res(child):
            pairs.append((f"middle_block.{c}", f"mid_block.resnets.{r}", "res"))
            r += 1
        elif _is_attn(child):
            pairs.append((f"middle_block.{c}", "mid_block.attentions.0", "attn"))
    level = i = 0
    for n, block in enumerate(unet.output_blocks):
        upsampled = False
        for c, child in enumerate(block):
            if _is_res(child):
                pairs.append((f"output_blocks.{n}.{c}", f"up_blocks.{level}.resnets.{i}", "res"))
            elif _is_attn(child):
                pairs.append((f"output_blocks.{n}.{c}", f"up_blocks.{level}.attentions.{i}", "attn"))
            elif _is_up(child):
                pairs.append((f"output_blocks.{n}.{c}", f"up_blocks.{level}.upsamplers.0", "up"))
                upsampled = True
        i += 1
        if upsampled:
            level, i = level + 1, 0
    return pairs


def _block_pairs_diffusers(unet) -> list[tuple[str, str, str]]:
    pairs = []
    n = 1
    for x, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for i in range(len(block.resnets)):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{x}.resnets.{i}", "res"))
            if attns is not None and i < len(attns):
                pairs.append((f"input_blocks.{n}.1", f"down_blocks.{x}.attentions.{i}", "attn"))
            n += 1
        if getattr(block, "downsamplers", None):
            pairs.append((f"input_blocks.{n}.0", f"down_blocks.{x}.downsamplers.0", "down"))
            n += 1
    mid = unet.mid_block
    if mid is not None:
        has_attn = bool(getattr(mid, "attentions", None))
        pairs.append(("middle_block.0", "mid_block.resnets.0", "res"))
        if has_attn:
            pairs.append(("middle_block.1", "mid_block.attentions.0", "attn"))
        for r in range(1, len(mid.resnets)):
            pairs.append((f"middle_block.{r + (1 if has_attn else 0)}", f"mid_block.resnets.{r}", "res"))
    n = 0
    for x, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for i in range(len(block.resnets)):
            pairs.append((f"output_blocks.{n}.0", f"up_blocks.{x}.resnets.{i}", "res"))
            has_attn = attns is not None and i < len(attns)
            if has_attn:
                pairs.append((f"output_blocks.{n}.1", f"up_blocks.{x}.attentions.{i}", "attn"))
            if i == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                pairs.append((f"output_blocks.{n}.{2 if has_attn else 1}", f"up_blocks.{x}.upsamplers.0", "up"))
            n += 1
    return pairs


class UNetNames:
    """Module-name translation between the host's UNet and the other naming scheme."""

    def __init__(self, unet: nn.Module):
        self.kind = unet_kind(unet)
        if self.kind == LDM:
            pairs = _block_pairs_ldm(unet)
            self._blocks = {ldm: (diff, kind) for ldm, diff, kind in pairs}
            self._basic = dict(_BASIC)
            self._subs = _SUB
        elif self.kind == DIFFUSERS:
            pairs = _block_pairs_diffusers(unet)
            self._blocks = {diff: (ldm, kind) for ldm, diff, kind in pairs}
            self._basic = {v: k for k, v in _BASIC.items()}
            self._subs = {k: {v: s for s, v in m.items()} for k, m in _SUB.items()}
        else:
            self._blocks, self._basic, self._subs = {}, {}, {}

    def other(self, name: str) -> str | None:
        """`name` (a module path in the host's scheme) in the other scheme, or None."""
        if name in self._basic:
            return self._basic[name]
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            hit = self._blocks.get(prefix)
            if hit is None:
                continue
            other, kind = hit
            rest = ".".join(parts[cut:])
            if kind == "attn":
                return f"{other}.{rest}"
            sub = self._subs[kind].get(rest)
            return f"{other}.{sub}" if sub is not None else None
        return None

    def diffusers_name(self, name: str) -> str | None:
        return name if self.kind == DIFFUSERS else self.other(name)

    def ldm_name(self, name: str) -> str | None:
        return name if self.kind == LDM else self.other(name)


class _Targets:
    """Every name a LoRA file may use for each weight of one UNet -> that weight's parameter name."""

    def __init__(self, unet: nn.Module):
        self.names = UNetNames(unet)
        self.exact: dict[str, str] = {}
        self.flat: dict[str, str] = {}
        self.shapes: dict[str, torch.Size] = {}
        for mname, mod in unet.named_modules():
            w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
            if w is None or w.dim() < 2:
                continue
            pname = f"{mname}.weight"
            self.shapes[pname] = w.shape
            clean = mname.replace(".base_layer", "")  # PEFT-injected diffusers layers
            aliases = {clean}
            other = self.names.other(clean)
            if other:
                aliases.add(other)
            alt = _BASIC_ALT.get(self.names.ldm_name(clean) or "")
            if alt:
                aliases.add(alt)
            diff = self.names.diffusers_name(clean)
            if diff and ".to_" in diff:  # old diffusers attention-processor names
                proc = diff.replace(".to_", ".processor.to_")
                aliases.add(proc[:-2] if proc.endswith(".to_out.0") else proc)
            for a in aliases:
                self.exact[a] = pname
                self.flat[a.replace(".", "_")] = pname

    def lookup(self, base: str) -> str | None:
        changed = True
        while changed:  # prefixes may nest: base_model.model.unet....
            changed = False
            for p in _UNET_PREFIXES:
                if base.startswith(p):
                    base, changed = base[len(p):], True
        return self.exact.get(base) or self.flat.get(base.replace(".", "_"))


@dataclass
class Resolved:
    """A file's layers placed on one UNet."""

    by_param: dict[str, LoraLayer]
    matched: int
    total: int
    unmatched: list[str]
    wrong_shape: list[tuple[str, tuple, tuple]]


def _resolve(lf: LoraFile, targets: _Targets) -> Resolved:
    by_param, unmatched, wrong = {}, [], []
    for base, layer in lf.layers.items():
        pname = targets.lookup(base)
        if pname is None:
            unmatched.append(base)
            continue
        shape = targets.shapes[pname]
        out_ok = layer.up.shape[0] == shape[0]
        in_numel = layer.down[0].numel() if layer.mid is None else layer.down.shape[1] * layer.mid[0, 0].numel()
        if not out_ok or in_numel != shape[1:].numel():
            wrong.append((base, (layer.up.shape[0], in_numel), tuple(shape)))
            continue
        by_param[pname] = layer
    return Resolved(by_param, len(by_param), len(lf.layers), unmatched, wrong)


# --- state ---------------------------------------------------------------------------------------

class LoraState:
    """What is fused into one UNet's weights, and the exact copies needed to undo it."""

    def __init__(self, unet: nn.Module):
        self._unet = weakref.ref(unet)
        self.originals: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}  # the tensor object we changed, to notice replacements
        self.signature: dict[str, tuple] = {}  # param -> ((file key, strength), ...) fused into it now
        self.applied: tuple[tuple[LoraSpec, tuple], ...] = ()
        self.owner: object | None = None  # host bookkeeping: who asked for what is fused (hosts/comfy_lora.py)
        self._targets: _Targets | None = None
        self._resolved: dict[tuple, Resolved] = {}
        self.lock = threading.RLock()

    @property
    def targets(self) -> _Targets:
        if self._targets is None:
            self._targets = _Targets(self._unet())
        return self._targets

    def resolve(self, lf: LoraFile, config: LoraConfig) -> Resolved:
        key = (lf.key, config.min_match)
        r = self._resolved.get(key)
        if r is None:
            r = _resolve(lf, self.targets)
            _check_match(lf, r, self.targets, config)
            _check_plain_weights(lf, r, self._unet())
            if len(self._resolved) > 32:
                self._resolved.pop(next(iter(self._resolved)))
            self._resolved[key] = r
        return r

    @property
    def active(self) -> bool:
        return bool(self.originals)


_states: "weakref.WeakKeyDictionary[nn.Module, LoraState]" = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def lora_state(unet: nn.Module) -> LoraState:
    with _states_lock:
        st = _states.get(unet)
        if st is None:
            st = _states[unet] = LoraState(unet)
        return st


def _arch_label(targets: _Targets) -> str:
    shapes = targets.shapes
    ctx = next((s[1] for n, s in shapes.items() if n.endswith("attn2.to_k.weight")), None)
    arch = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}.get(ctx, f"cross-attention width {ctx}")
    return f"{arch} UNet ({targets.names.kind}, {len(shapes)} weight layers)"


def _check_match(lf: LoraFile, r: Resolved, targets: _Targets, config: LoraConfig):
    ok = r.matched / max(1, r.total)
    if r.matched and ok >= config.min_match and not r.wrong_shape:
        if r.unmatched:
            logger.warning("SD Accel LoRA: %s: %d of %d layers have no counterpart in this model and are skipped (e.g. %s).",
                           lf.name, len(r.unmatched), r.total, r.unmatched[0])
        return
    detail = ""
    if r.wrong_shape:
        base, got, want = r.wrong_shape[0]
        detail = f"; {len(r.wrong_shape)} matched by name but have the wrong shape (e.g. {base}: LoRA {got[0]}x{got[1]}, model {'x'.join(map(str, want))})"
    example = f"; unmatched e.g. {r.unmatched[0]}" if r.unmatched else ""
    raise SDAccelError(f"SD Accel LoRA: {lf.name} does not fit this model: {r.matched} of {r.total} UNet layers matched"
                       f"{detail}{example}. The model is an {_arch_label(targets)}; the LoRA was probably made for another "
                       "architecture (e.g. SDXL vs SD1.5). Pick a LoRA made for this checkpoint's base model. The model was not changed.")


def _check_plain_weights(lf: LoraFile, r: Resolved, unet: nn.Module):
    # Scaled-fp8 / quantized storage (ComfyUI's scaled fp8 ops, QuantizedTensor) keeps weight/scale
    # or packed data: adding a delta to it in place would be wrong. Plain fp8 storage is fine
    # (the fused weight is rounded, the original bits are restored from the exact copy).
    for pname in r.by_param:
        mod = unet.get_submodule(pname.rsplit(".", 1)[0])
        w = mod.weight
        if getattr(mod, "scale_weight", None) is not None or type(w.data) not in (torch.Tensor, nn.Parameter):
            raise SDAccelError(f"SD Accel LoRA: {lf.name}: this model stores its UNet weights scaled or quantized "
                               f"({type(w.data).__name__}, {w.dtype}; e.g. {pname}), which in-place LoRA fusing cannot change "
                               "exactly. Load the checkpoint in fp16/bf16/fp32, or use ComfyUI's LoraLoader for this model. "
                               "The model was not changed.")


# --- the verb --------------------------------------------------------------------------------------

def _backup(t: torch.Tensor, config: LoraConfig) -> torch.Tensor:
    if config.backup_device == "cpu" and t.device.type != "cpu":
        return t.detach().to("cpu", copy=True)
    return t.detach().clone()


def _param(unet: nn.Module, pname: str) -> torch.Tensor:
    mod_name, _, attr = pname.rpartition(".")
    return getattr(unet.get_submodule(mod_name), attr)


def apply_loras(unet: nn.Module, loras, config: LoraConfig | None = None) -> LoraReport:
    """Bring `unet` to exactly the LoRAs in `loras` (a list of LoraSpec), in place.

    Example:
        >>> apply_loras(unet, [LoraSpec("style.safetensors", 0.8), LoraSpec("detail.safetensors", 0.5)])
        >>> apply_loras(unet, [LoraSpec("other.safetensors", 1.0)])   # swap: no recompilation
        >>> apply_loras(unet, [])                                       # original weights, bit-exact

    Every file is read and checked against the UNet before any weight changes, so a bad file
    or a LoRA for another architecture raises SDAccelError with the model untouched.
    """
    config = config or LoraConfig()
    if not isinstance(unet, nn.Module):
        raise SDAccelError(f"SD Accel LoRA: expected a UNet (torch nn.Module), found {type(unet).__name__}.")
    specs = []
    for s in loras or ():
        if not isinstance(s, LoraSpec):
            raise SDAccelError(f"SD Accel LoRA: expected LoraSpec(path, strength) items, found {type(s).__name__}.")
        if s.strength != 0:
            specs.append(s)
    state = lora_state(unet)
    with state.lock:
        files = [read_lora(s.path) for s in specs]
        placed = [state.resolve(lf, config) for lf in files]
        wanted: dict[str, list[tuple[tuple, float, LoraLayer]]] = {}
        for spec, lf, r in zip(specs, files, placed):
            for pname, layer in r.by_param.items():
                wanted.setdefault(pname, []).append((lf.key, float(spec.strength), layer))
        applied = tuple((s, lf.key) for s, lf in zip(specs, files))
        report = LoraReport([(lf.name, s.strength, r.matched) for s, lf, r in zip(specs, files, placed)], 0, 0.0, False)
        if applied == state.applied and set(wanted) == set(state.signature):
            return report
        t0 = time.perf_counter()
        changed = 0
        with torch.no_grad():
            for pname in list(state.signature.keys() | wanted.keys()):
                # Canonical order: the result depends on the set only, not on the order it was given in.
                contribs = sorted(wanted.get(pname, []), key=lambda c: (c[0], c[1]))
                sig = tuple((k, s) for k, s, _ in contribs)
                if sig == state.signature.get(pname, ()):
                    continue
                param = _param(unet, pname)
                if pname in state.originals and state.params[pname] is not param:
                    # Someone replaced the Parameter object under us: our copy belongs to the old one.
                    logger.warning("SD Accel LoRA: %s was replaced by another patcher; taking the new tensor as the original.", pname)
                    for d in (state.originals, state.params, state.signature):
                        d.pop(pname, None)
                if pname not in state.originals:
                    if not contribs:
                        continue
                    state.originals[pname] = _backup(param.data, config)
                    state.params[pname] = param
                orig = state.originals[pname]
                if not contribs:
                    param.data.copy_(orig)
                    del state.originals[pname], state.params[pname], state.signature[pname]
                else:
                    d = None
                    for _, strength, layer in contribs:
                        x = layer.delta(param.shape, param.device)
                        d = x.mul_(strength) if d is None else d.add_(x, alpha=strength)
                    param.data.copy_(orig.to(param.device, torch.float32) + d)
                    state.signature[pname] = sig
                changed += 1
        state.applied = applied
        report.layers_changed, report.seconds, report.changed = changed, time.perf_counter() - t0, changed > 0
        return report


__all__ = ["LoraSpec", "LoraConfig", "LoraReport", "LoraState", "apply_loras", "read_lora", "parse_lora",
           "lora_state", "UNetNames"]
