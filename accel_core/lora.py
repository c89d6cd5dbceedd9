"""LoRA hot-swap: fuse LoRAs into a UNet's weights in place, swap and remove them exactly.

`apply_loras(unet, [LoraSpec(path, strength), ...])` brings the UNet to exactly that set of
LoRAs. Deltas are fused into the existing weight tensors (`param.data.copy_`), so a compiled
graph, CUDA graph or other backend that captured the parameters sees the new weights with
no recompilation. Before a weight is first changed, an exact copy of it is kept; every later
state of that weight is computed from the copy (`original + sum(strength * delta)`), so
swapping A for B, changing a strength or removing one LoRA never drifts, and removing all
of them restores the original bits.

Files: see `lora_file` (kohya, diffusers/PEFT, XLabs, LoCon, `.diff`/`.diff_b`). Models: SD1.x/SDXL
UNets (LDM `UNetModel` as in ComfyUI and A1111/Forge, or diffusers' `UNet2DConditionModel`) and
the DiT families with a LoRA name map (Flux, Qwen-Image, Z-Image, Wan): see `lora_names`. A
name may point at a slice of a fused weight (Flux's qkv); every slice of one weight is summed
into the one exact copy. Text-encoder keys are skipped (counted in the report).
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SDAccelError, check_range, choice_error
from .fp8 import requantize_param
from .log import logger
from .options import declared, option
from .lora_file import LoraFile, add_patch, move_factors, parse_lora, read_lora
from .lora_names import Resolved, UNetNames, resolve_lora, Targets, display, guess_family

BACKUP_DEVICES = ("same", "cpu")

@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a .safetensors file and its strength (0 = not applied)."""

    path: str
    strength: float = option(1.0, "How strongly the LoRA changes the UNet; 0 leaves the model as it is.", label="LoRA strength",
                             min=-100.0, max=100.0, step=0.01)

    def __post_init__(self):
        opt = declared(self)["strength"]
        check_range("LoRA", f"the strength of {self.path!r}", self.strength, opt.min, opt.max, "Use 1.0 for the LoRA as trained, 0 to leave it out.")


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


# --- state ---------------------------------------------------------------------------------------

class LoraState:
    """What is fused into one UNet's weights, and the exact copies needed to undo it."""

    def __init__(self, unet: nn.Module):
        self._unet = weakref.ref(unet)
        self.originals: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}  # the tensor object we changed, to notice replacements
        self.signature: dict[str, tuple] = {}  # param -> ((file key, strength), ...) fused into it now
        self.applied: tuple[tuple[LoraSpec, tuple], ...] = ()
        self.owner: object | None = None  # host bookkeeping: who asked for what is fused (hosts/comfy/lora_set.py)
        self.last_run: tuple | None = None  # host bookkeeping: the set the last run asked for (its log says "swapped" on a change)
        self._targets: Targets | None = None
        self._resolved: dict[tuple, Resolved] = {}
        self.lock = threading.RLock()

    @property
    def targets(self) -> Targets:
        if self._targets is None:
            self._targets = Targets(self._unet())
        return self._targets

    def resolve(self, lf: LoraFile, config: LoraConfig) -> Resolved:
        key = (lf.key, config.min_match)
        r = self._resolved.get(key)
        if r is None:
            r = resolve_lora(lf, self.targets)
            _check_match(lf, r, self.targets, config)
            _check_plain_weights(lf, r, self._unet())
            if len(self._resolved) > 32:
                self._resolved.pop(next(iter(self._resolved)))
            self._resolved[key] = r
        return r

    @property
    def active(self) -> bool:
        return bool(self.originals)

    @property
    def unet(self) -> nn.Module | None:
        return self._unet()

    def __deepcopy__(self, memo):
        return None  # a copied UNet has nothing fused that this state could undo: it starts its own

    def __copy__(self):
        return None


STATE_ATTR = "_sd_accel_lora"  # on the UNet: its LoraState (per model, goes with it)
_create_lock = threading.Lock()


def lora_state(unet: nn.Module) -> LoraState:
    """The UNet's LoraState, kept on the UNet itself (a copy of the UNet starts without one)."""
    st = unet.__dict__.get(STATE_ATTR)
    if isinstance(st, LoraState) and st.unet is unet:
        return st
    with _create_lock:
        st = unet.__dict__.get(STATE_ATTR)
        if not (isinstance(st, LoraState) and st.unet is unet):
            st = LoraState(unet)
            object.__setattr__(unet, STATE_ATTR, st)  # plain attribute: no submodule, no state_dict entry
        return st


def original_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: exact original tensor} for every weight that has LoRA deltas fused now
    (empty when none): what a copy of `unet` without the LoRAs is made from (FP16 Cast)."""
    state = lora_state(unet)
    with state.lock:
        return dict(state.originals)


def _check_match(lf: LoraFile, r: Resolved, targets: Targets, config: LoraConfig):
    ok = r.matched / max(1, r.total)
    if r.matched and ok >= config.min_match and not r.wrong_shape:
        if r.unmatched:
            logger.warning("SD Accel LoRA: %s: %d of %d layers have no counterpart in this model and are skipped (e.g. %s).",
                           lf.name, len(r.unmatched), r.total, r.unmatched[0])
        return
    detail = ""
    if r.wrong_shape:
        base, got, want = r.wrong_shape[0]
        detail = (f"; {len(r.wrong_shape)} matched by name but have the wrong shape (e.g. {base}: LoRA "
                  f"{'x'.join(map(str, got))}, model {'x'.join(map(str, want))})")
    example = f"; unmatched e.g. {r.unmatched[0]}" if r.unmatched else ""
    guess = guess_family(r.unmatched or [w[0] for w in r.wrong_shape])
    if guess and guess != targets.group:
        made_for = f"made for a {display(guess)} model"
    else:
        made_for = "made for another size or version of this architecture (e.g. SDXL vs SD1.5, Wan 14B vs 5B)"
    raise SDAccelError(f"SD Accel LoRA: {lf.name} does not fit this model: {r.matched} of {r.total} layers matched"
                       f"{detail}{example}. The model is a {targets.label()}; the LoRA looks {made_for}. "
                       "Pick a LoRA made for this model's base model. The model was not changed.")


def _param(unet: nn.Module, pname: str) -> torch.Tensor:
    mod_name, _, attr = pname.rpartition(".")
    return getattr(unet.get_submodule(mod_name) if mod_name else unet, attr)


def _check_plain_weights(lf: LoraFile, r: Resolved, unet: nn.Module):
    # Scaled-fp8 / quantized storage (ComfyUI's scaled fp8 ops, QuantizedTensor) keeps weight/scale
    # or packed data: adding a delta to it in place would be wrong. Plain fp8 storage is fine
    # (the fused weight is rounded, the original bits are restored from the exact copy).
    for pname in r.by_param:
        mod = unet.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else unet
        w = _param(unet, pname)
        if getattr(mod, "scale_weight", None) is not None or type(w.data) not in (torch.Tensor, nn.Parameter):
            raise SDAccelError(f"SD Accel LoRA: {lf.name}: this model stores its weights scaled or quantized "
                               f"({type(w.data).__name__}, {w.dtype}; e.g. {pname}), which in-place LoRA fusing cannot change "
                               "exactly. Load the checkpoint in fp16/bf16/fp32, or use ComfyUI's LoraLoader for this model. "
                               "The model was not changed.")


# --- the verb --------------------------------------------------------------------------------------

def _backup(t: torch.Tensor, config: LoraConfig) -> torch.Tensor:
    if config.backup_device == "cpu" and t.device.type != "cpu":
        return t.detach().to("cpu", copy=True)
    return t.detach().clone()




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
        raise SDAccelError(f"SD Accel LoRA: expected a diffusion model (torch nn.Module), found {type(unet).__name__}.")
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
        wanted: dict[str, list[tuple[tuple, float, object, object]]] = {}  # param -> [(file key, strength, layer, offset)]
        for spec, lf, r in zip(specs, files, placed):
            for pname, patches in r.by_param.items():
                wanted.setdefault(pname, []).extend((lf.key, float(spec.strength), layer, off) for layer, off in patches)
        applied = tuple((s, lf.key) for s, lf in zip(specs, files))
        report = LoraReport([(lf.name, s.strength, r.matched) for s, lf, r in zip(specs, files, placed)], 0, 0.0, False)
        if applied == state.applied and set(wanted) == set(state.signature):
            return report
        t0 = time.perf_counter()
        changed = 0
        with torch.no_grad():
            by_device: dict[torch.device, list] = {}
            for pname, contribs in wanted.items():
                by_device.setdefault(_param(unet, pname).device, []).extend(c[2] for c in contribs)
            for device, layers in by_device.items():
                move_factors(layers, device)
            for pname in list(state.signature.keys() | wanted.keys()):
                # Canonical order: the result depends on the set only, not on the order it was given in.
                contribs = sorted(wanted.get(pname, []), key=lambda c: (c[0], c[1]))
                sig = tuple((k, s) for k, s, _, _ in contribs)
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
                    # A new contiguous tensor: never the backup itself, and one view() can flatten (channels_last weights).
                    acc = orig.to(param.device, torch.float32, copy=True, memory_format=torch.contiguous_format)
                    for _, strength, layer, offset in contribs:
                        add_patch(layer, acc, strength, offset)
                    param.data.copy_(acc)
                    state.signature[pname] = sig
                requantize_param(unet, pname)  # an fp8 copy of this weight (FP16 Cast fp8) follows it
                changed += 1
        state.applied = applied
        report.layers_changed, report.seconds, report.changed = changed, time.perf_counter() - t0, changed > 0
        return report


__all__ = ["LoraSpec", "LoraConfig", "LoraReport", "LoraState", "apply_loras", "read_lora", "parse_lora",
           "lora_state", "original_weights", "UNetNames"]
