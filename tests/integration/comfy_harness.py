"""Drive a real ComfyUI from tests, headless on the CPU.

What the integration tests share (conftest.py turns these into fixtures; the DeepCache,
LoRA and LCM integration tests reuse them):

- `boot(root)`: put the ComfyUI tree named by COMFYUI_PATH on sys.path, force the CPU,
  import ComfyUI and load this pack the way ComfyUI does (`nodes.load_custom_node` on the
  repo root). Returns a `Host`, whose `pack_module()` gives the pack's modules as ComfyUI
  imported them (module state such as the compile registry lives there, not in `sd_accel.*`).
- `write_sd15_checkpoint()` / `load_checkpoint()`: a safetensors file of the real SD1.5 UNet
  architecture with seeded random weights, built from ComfyUI's own UNetModel and loaded back
  through ComfyUI's own loader (shape-based detection must recognise it as SD1.5).
- `write_kohya_lora()`: a small LoRA over the UNet's attention layers, kohya format with the
  diffusers-style names real SD1.5 LoRA files use.
- `Case`, `sample()`: txt2img / img2img / inpaint through `nodes.common_ksampler` under
  `torch.inference_mode()`, as the server runs a prompt.

No model weights are downloaded; nothing here writes into the ComfyUI tree.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ENV = "COMFYUI_PATH"
REPO = Path(__file__).resolve().parents[2]

# comfy/model_detection.py's SD15 config (without dtype): the architecture every SD1.x
# checkpoint has. Building from it and loading through detection checks both ends.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
CONTEXT_DIM = 768
# A few-MB UNet of the same family, for tests about lifetimes and plumbing rather than numbers.
TINY_UNET_CONFIG = dict(SD15_UNET_CONFIG, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
                        transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                        context_dim=32)


def host_root() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value).resolve() if value else None


def skip_reason() -> str | None:
    """Why the integration tests cannot run here, or None."""
    root = host_root()
    if root is None:
        return f"{ENV} is not set: point it at a ComfyUI source tree to run the integration tests (see docs/testing.md)"
    if not (root / "nodes.py").is_file() or not (root / "comfy").is_dir():
        return f"{ENV}={root} is not a ComfyUI tree (no nodes.py / comfy/ there)"
    return None


# --- booting ComfyUI ------------------------------------------------------------------------------

@dataclass
class Host:
    root: Path
    version: str
    nodes: object  # ComfyUI's `nodes` module
    pack: object  # this pack's package, as ComfyUI imported it
    load_log: list[str] = field(default_factory=list)

    def pack_module(self, dotted: str):
        """`accel_core.hosts.comfy` etc. from the pack ComfyUI loaded (shares its module state)."""
        return importlib.import_module(f"{self.pack.__name__}.{dotted}")

    def node(self, node_id: str):
        """A fresh instance of a registered node class, as the executor makes one per graph node."""
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]()


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


_booted: Host | None = None


def boot(root: Path) -> Host:
    """Import ComfyUI from `root` on the CPU and load this pack into it. Once per process."""
    global _booted
    if _booted is not None:
        if _booted.root != root:
            raise RuntimeError(f"ComfyUI {_booted.root} is already imported in this process; cannot switch to {root}")
        return _booted
    sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True  # read once when comfy.model_management is imported
    import comfy.model_management  # noqa: F401

    # transformers decides once (lru_cache) whether torchvision exists. Let it see the truth
    # before the CPU stand-in goes on the path; ComfyUI imports torchvision only by name.
    try:
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        import_utils.is_torchvision_v2_available()
    except ImportError:
        pass
    stubs = root / "_cpu_stubs"
    if stubs.is_dir():
        sys.path.append(str(stubs))
    import nodes

    capture = _Capture()
    logging.getLogger().addHandler(capture)
    try:
        ok = nodes.load_custom_node(str(REPO))
        if inspect.iscoroutine(ok):  # async in ComfyUI >= 0.3.4x
            ok = asyncio.run(ok)
    finally:
        logging.getLogger().removeHandler(capture)
    if not ok:
        raise RuntimeError(f"ComfyUI could not import the pack from {REPO}:\n" + "\n".join(capture.lines))
    pack = sys.modules[str(REPO).replace(".", "_x_")]
    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "unknown"
    _booted = Host(root, version, nodes, pack, capture.lines)
    return _booted


# --- checkpoints and LoRAs ------------------------------------------------------------------------

def write_sd15_checkpoint(path: Path, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float16) -> Path:
    """Save an SD1.5-architecture UNet with seeded normal(0, std) weights (norms: weight 1, bias 0).

    Built from ComfyUI's own UNetModel, keys under `model.diffusion_model.`. fp16 halves the
    file (1.7 GB); ComfyUI on the CPU loads it as fp32 (see `load_checkpoint`).
    """
    import comfy.supported_models
    import comfy.utils

    mc = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG))
    mc.set_inference_dtype(dtype, None)
    unet = mc.get_model({}, "", device=torch.device("cpu")).diffusion_model  # parameters uninitialised
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for name, module in unet.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                else:
                    p.normal_(0.0, std, generator=g)
                sd[f"model.diffusion_model.{name}.{pname}"] = p
    comfy.utils.save_torch_file(sd, str(path))
    return path


def load_checkpoint(path: Path):
    """The MODEL (ModelPatcher) ComfyUI's CheckpointLoader path makes of `path` (no CLIP/VAE in the file)."""
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False, output_clipvision=False)
    return out[0]


def tiny_unet_model(seed: int = 0, std: float = 0.05):
    """A MODEL around a tiny SD1.x-family UNet (TINY_UNET_CONFIG), built directly from ComfyUI's
    classes: shape detection would not call it SD1.5, so it cannot go through the loader."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    mc = comfy.supported_models.SD15(dict(TINY_UNET_CONFIG))
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in base.diffusion_model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                else:
                    p.normal_(0.0, std, generator=g)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def lora_targets(model) -> dict[str, tuple[int, ...]]:
    """kohya name -> weight shape for every attention-block Linear / 1x1 conv of an SD1.x UNet,
    named the way real SD1.5 LoRA files name them (diffusers module paths)."""
    import comfy.utils

    unet = model.model.diffusion_model
    weights = dict(unet.state_dict())
    targets = {}
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        if "attentions" not in diffusers_key or not diffusers_key.endswith(".weight"):
            continue
        w = weights.get(ldm_key)
        if w is None or w.dim() not in (2, 4) or (w.dim() == 4 and w.shape[2:] != (1, 1)):
            continue
        targets["lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")] = tuple(w.shape)
    return targets


def write_kohya_lora(path: Path, targets: dict[str, tuple[int, ...]], rank: int = 4, seed: int = 1, std: float = 0.08) -> Path:
    """A kohya LoRA (`<name>.lora_up.weight`, `.lora_down.weight`, `.alpha`) over `targets`."""
    import comfy.utils

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in targets.items():
        out_f, in_f, tail = shape[0], shape[1], tuple(shape[2:])
        sd[f"{name}.lora_down.weight"] = (torch.randn((rank, in_f, *tail), generator=g) * std).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn((out_f, rank, *tail), generator=g) * std).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    comfy.utils.save_torch_file(sd, str(path))
    return path


# --- sampling -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One way of sampling: txt2img (empty latent), img2img (denoise < 1 on a non-zero latent),
    inpaint (noise_mask: only the masked half is resampled)."""

    name: str
    denoise: float = 1.0
    init: bool = False
    mask: bool = False

    def latent(self, size: int = 8) -> dict:
        if not self.init:
            return {"samples": torch.zeros(1, 4, size, size)}
        g = torch.Generator().manual_seed(7)
        out = {"samples": torch.randn((1, 4, size, size), generator=g)}
        if self.mask:
            mask = torch.zeros(1, 1, size, size)
            mask[..., :, size // 2:] = 1.0
            out["noise_mask"] = mask
        return out


TXT2IMG = Case("txt2img")
IMG2IMG = Case("img2img", denoise=0.5, init=True)
INPAINT = Case("inpaint", denoise=1.0, init=True, mask=True)
CASES = (TXT2IMG, IMG2IMG, INPAINT)


def step_cache(host, model, mode="fixed", interval=3, front=1, back=0, threshold=0.1, max_cached=3, start=0.0, end=1.0, cfg="separate", **kw):
    """`model` through the SDAccelStepCache node (its inputs in the node's order)."""
    return host.node("SDAccelStepCache").apply(model, mode, interval, front, back, threshold, max_cached, start, end, cfg, **kw)[0]


def record_calls(m) -> list:
    """Wrap `m`'s model calls (set_model_unet_function_wrapper) to record each as (input, timestep, c, output)."""
    calls = []

    def record(apply_model, a):
        out = apply_model(a["input"], a["timestep"], **a["c"])
        calls.append((a["input"].clone(), a["timestep"].clone(), a["c"], out.clone()))
        return out

    m.set_model_unet_function_wrapper(record)
    return calls


def check_full_calls(m, calls, full=(0, 3, 6), cached=1):
    """The recorded `full` calls equal the model recomputed without the cache (the run is over: the cache passes
    through), bit for bit; the `cached` call does not."""
    base = m.model
    with torch.inference_mode():
        for step in full:
            x, t, c, out = calls[step]
            assert torch.equal(base.apply_model(x, t, **c), out), step
        x, t, c, out = calls[cached]
        assert not torch.equal(base.apply_model(x, t, **c), out)  # a cached call is not the full one


def conditioning(seed: int = 3, dim: int = CONTEXT_DIM):
    """Positive and negative SD1.x conditioning (random CLIP-like embeddings, no text encoder)."""
    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn((1, 77, dim), generator=g), {}]]
    neg = [[torch.randn((1, 77, dim), generator=g), {}]]
    return pos, neg


def sample(model, case: Case = TXT2IMG, steps: int = 2, cfg: float = 4.0, seed: int = 42, size: int = 8) -> torch.Tensor:
    """Sample with ComfyUI's KSampler path (euler, cfg > 1 so cond and uncond both run)."""
    import nodes

    pos, neg = conditioning(dim=model.model.model_config.unet_config["context_dim"])
    with torch.inference_mode():
        out = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", pos, neg, case.latent(size), denoise=case.denoise)
    return out[0]["samples"].clone()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# --- model state, for isolation checks ------------------------------------------------------------

@dataclass
class Snapshot:
    """What a node must leave alone on its input MODEL."""

    params: dict
    wrappers: dict
    model_options: str
    unet: object
    patches_uuid: object

    @classmethod
    def of(cls, model) -> "Snapshot":
        # The UNet as the patcher defines it: another clone's object patch may hold the shared model while loaded.
        unet = model.get_model_object("diffusion_model")
        params = {n: (p, p.dtype, p.data_ptr(), p.stride(), p.detach().flatten()[:8].clone(), p.detach().float().sum().item())
                  for n, p in unet.named_parameters()}
        wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in model.wrappers.items()}
        return cls(params, wrappers, repr(model.model_options), unet, model.patches_uuid)

    def diff(self, model) -> list[str]:
        """What changed since the snapshot (empty: nothing)."""
        now = Snapshot.of(model)
        out = []
        if now.unet is not self.unet:
            out.append("diffusion_model object replaced")
        for n, (p, dtype, ptr, stride, head, total) in self.params.items():
            q, qdtype, qptr, qstride, qhead, qtotal = now.params[n]
            if q is not p or (qdtype, qptr, qstride, qtotal) != (dtype, ptr, stride, total) or not torch.equal(head, qhead):
                out.append(f"parameter {n} changed")
                if len(out) > 5:
                    break
        if now.wrappers != self.wrappers:
            out.append(f"wrappers changed: {self.wrappers} -> {now.wrappers}")
        if now.model_options != self.model_options:
            out.append("model_options changed")
        if now.patches_uuid != self.patches_uuid:
            out.append("patches_uuid changed")
        return out
