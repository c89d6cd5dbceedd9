"""What one `sd-accel serve` replica runs, without Ray: requests, batches, sampling, artifacts.

A replica holds one diffusers UNet (the bench's embedded default, or a user's checkpoint) and
serves JSON requests: seeded Euler sampling with CFG, with SD Accel's compile (once per
replica), DeepCache and LoRA hot-swap chosen per request through the core's public verbs.
Requests that share steps, size, CFG, DeepCache and LoRAs run as one UNet batch, padded to a
fixed set of batch sizes so the compiled UNet meets a handful of shapes; the padding rows are
dropped. Each request's latent depends only on its own seed and settings.

`Pipeline.export_artifacts()` / `import_artifacts()` carry the compiled code between replicas
(cache_artifacts' files); `deployment.py` hands them out with Ray.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, replace

import torch

from ...accel_core import CompileConfig, DeepCacheConfig, LoraSpec, SDAccelError, apply_loras, compile, deepcache
from ...accel_core import cache_artifacts as ca
from ...accel_core.options import declared
from ..bench.measure import make_inputs
from ..bench.models import PRESETS, Preset, build_unet

# A UNet of a few kB with the SD block kinds (cross-attention down/up, mid block): for tests of the
# serving plumbing, where compile time matters more than numbers.
MICRO = Preset(dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,), norm_num_groups=4,
                    cross_attention_dim=8, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",),
                    up_block_types=("CrossAttnUpBlock2D",)), latent=8, steps=4, context_len=4)
SERVE_PRESETS = {**PRESETS, "micro": MICRO}
OUTPUTS = ("latent", "preview")
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")
# SD1.x latent -> RGB (the linear map ComfyUI's and the webui's live previews use).
LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


class RequestError(SDAccelError):
    """A request this replica refuses (HTTP `status`); the replica goes on serving."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeConfig:
    """What every replica of one deployment serves.

    Args:
        preset: the embedded model and its default size and steps ("tiny", "sd15-512", "sdxl-1024";
            "micro" for tests), seeded random weights (`seed`) unless `checkpoint` is given.
        checkpoint: an SD1.x / SDXL .safetensors checkpoint or UNet file.
        device: "cpu" or "cuda" (one GPU per replica).
        compile: compile the UNet (inductor, `mode`) in every replica, once; DeepCache's paths too.
        max_batch_size: requests batched into one UNet call (Serve's batching); batches are padded
            to a power of two up to it.
        batch_wait_s: how long a replica waits for more requests to fill a batch.
        max_steps / max_side / max_body_bytes: requests above these are refused (413).
        lora_dir: folder of .safetensors LoRAs that requests name (without the extension).
        cache_dir: a folder every replica shares for the compile artifacts (None: the object store).
        isolated_torch_cache: each replica keeps torch's own caches in a folder of its own, as on
            separate machines (so only the artifacts it was handed can warm it).
        threads: torch CPU threads per replica (None: torch's default).
        warmup: compile at start (each batch size), so the first request is served warm.
        warm_deepcache: the DeepCache settings ((interval, depth), ...) compiled at start too, so a
            request with one of them is served warm; other settings compile on their first request.
        work_dir: where the replica's temporary folders go (None: the system's temp folder); they
            are removed when the replica stops (`Pipeline.close`).
        inductor_options: torch._inductor.config values set in each replica process, e.g.
            {"fallback_by_default": True} (no generated kernels: fast compiles, for tests).
    """

    preset: str = "tiny"
    checkpoint: str | None = None
    device: str = "cpu"
    seed: int = 0
    compile: bool = True
    mode: str = "default"
    max_batch_size: int = 4
    batch_wait_s: float = 0.05
    max_steps: int = 50
    max_side: int | None = None  # latent side; None: twice the preset's
    max_body_bytes: int = 64 * 1024
    lora_dir: str | None = None
    cache_dir: str | None = None
    isolated_torch_cache: bool = False
    threads: int | None = None
    warmup: bool = True
    warm_deepcache: tuple = ((3, 0),)
    work_dir: str | None = None
    inductor_options: dict | None = None

    def __post_init__(self):
        if self.preset not in SERVE_PRESETS:
            raise SDAccelError(f"SD Accel serve: unknown preset {self.preset!r}; expected one of {', '.join(SERVE_PRESETS)}. Pick one, or give --checkpoint.")
        if self.device not in ("cpu", "cuda"):
            raise SDAccelError(f"SD Accel serve: device must be 'cpu' or 'cuda', found {self.device!r}. Use cuda on GPU workers.")
        for name in ("max_batch_size", "max_steps", "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SDAccelError(f"SD Accel serve: {name} must be a whole number of at least 1, found {v!r}. Give e.g. {getattr(ServeConfig, name)}.")
        for dc in self.warm_deepcache:
            if not (isinstance(dc, (tuple, list)) and len(dc) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in dc)
                    and dc[0] >= 2 and 0 <= dc[1] <= 11):
                raise SDAccelError(f"SD Accel serve: each warm DeepCache setting must be (interval >= 2, depth 0..11), found {dc!r}. "
                                   "Give e.g. 3:0, or none.")
        if self.lora_dir is not None and not os.path.isdir(self.lora_dir):
            raise SDAccelError(f"SD Accel serve: the LoRA folder {self.lora_dir!r} does not exist; expected a folder of .safetensors files. "
                               "Give an existing folder, or leave --lora-dir out.")

    @property
    def spec(self) -> Preset:
        return SERVE_PRESETS[self.preset]

    @property
    def side_limit(self) -> int:
        return self.max_side or 2 * self.spec.latent

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Request:
    seed: int
    steps: int
    cfg: float
    side: int
    deepcache: tuple[int, int] | None  # (interval, depth)
    loras: tuple[tuple[str, float], ...]
    output: str
    received: float = field(default=0.0, compare=False)

    @property
    def group(self) -> tuple:
        """Requests with the same group run as one UNet batch."""
        return (self.steps, self.cfg, self.side, self.deepcache, self.loras)


def _int(body: dict, key: str, default: int, lo: int, hi: int | None, hi_why: str = "") -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise RequestError(f"SD Accel serve: {key!r} must be a whole number of at least {lo}, found {v!r}. Give e.g. {key}: {default}.")
    if hi is not None and v > hi:
        raise RequestError(f"SD Accel serve: {key!r} is {v}, above this deployment's limit of {hi}{hi_why}. Ask for {hi} or less.", 413)
    return v


def parse_request(body: bytes, cfg: ServeConfig, loras: dict[str, str]) -> Request:
    """A checked Request from an HTTP body; RequestError (400, or 413 when too large) otherwise."""
    if len(body) > cfg.max_body_bytes:
        raise RequestError(f"SD Accel serve: the request body is {len(body)} bytes, above the limit of {cfg.max_body_bytes}. "
                           "Send the JSON settings only (seed, steps, cfg, side, deepcache, loras, output).", 413)
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"SD Accel serve: expected a JSON object, found a body that is not JSON ({e}). "
                           'Send e.g. {"seed": 1, "steps": 8}.') from None
    if not isinstance(data, dict):
        raise RequestError(f"SD Accel serve: expected a JSON object, found {type(data).__name__}. Send e.g. {{\"seed\": 1}}.")
    known = {"seed", "steps", "cfg", "side", "deepcache", "loras", "output"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RequestError(f"SD Accel serve: unknown field(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(sorted(known))}. Remove or rename them.")
    seed = _int(data, "seed", 0, 0, 2 ** 63 - 1)
    steps = _int(data, "steps", cfg.spec.steps, 1, cfg.max_steps)
    side = _int(data, "side", cfg.spec.latent, 1, cfg.side_limit, " (the latent side: pixels / 8)")
    if side % 8 and side != cfg.spec.latent:
        raise RequestError(f"SD Accel serve: 'side' must be a multiple of 8 (latent pixels), found {side}. Give e.g. {cfg.spec.latent}.")
    g = data.get("cfg", 7.0)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 100:
        raise RequestError(f"SD Accel serve: 'cfg' must be a number in [0, 100], found {g!r}. Give e.g. 7.")
    dc = data.get("deepcache")
    dcv = None
    if dc is not None:
        if not isinstance(dc, dict) or set(dc) - {"interval", "depth"}:
            raise RequestError(f"SD Accel serve: 'deepcache' must be null or {{\"interval\": N, \"depth\": D}}, found {dc!r}. Give e.g. {{\"interval\": 3}}.")
        iv, dp = (declared(DeepCacheConfig)[n] for n in ("cache_interval", "cache_depth"))  # the same numbers as every other surface
        dcv = (_int(dc, "interval", iv.default, iv.min, iv.max), _int(dc, "depth", dp.default, dp.min, dp.max))
        try:
            DeepCacheConfig(cache_interval=dcv[0], cache_depth=dcv[1])
        except SDAccelError as e:
            raise RequestError(str(e)) from None
        if dcv[0] == 1:
            dcv = None
    specs = data.get("loras", [])
    if not isinstance(specs, list) or len(specs) > 8:
        raise RequestError(f"SD Accel serve: 'loras' must be a list of at most 8 {{\"name\": ..., \"strength\": ...}}, found {specs!r}. Give e.g. [{{\"name\": \"style\"}}].")
    picked = {}
    for s in specs:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or set(s) - {"name", "strength"}:
            raise RequestError(f"SD Accel serve: each LoRA must be {{\"name\": str, \"strength\": number}}, found {s!r}.")
        name, strength = s["name"], s.get("strength", 1.0)
        if name not in loras:
            have = ", ".join(sorted(loras)) or "none"
            where = f"the .safetensors files in {cfg.lora_dir}" if cfg.lora_dir else "no --lora-dir was given"
            raise RequestError(f"SD Accel serve: unknown LoRA {name!r}; this deployment has: {have} ({where}). Use one of those names "
                               "(the file name without .safetensors), or add the file to the LoRA folder and redeploy.")
        st = declared(LoraSpec)["strength"]
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not st.min <= strength <= st.max:
            raise RequestError(f"SD Accel serve: the strength of LoRA {name!r} must be a number in [{st.min:g}, {st.max:g}], found {strength!r}. Use 1.0 as trained.")
        if strength:
            picked[name] = picked.get(name, 0.0) + float(strength)
    out = data.get("output", "latent")
    if out not in OUTPUTS:
        raise RequestError(f"SD Accel serve: 'output' must be one of {', '.join(OUTPUTS)}, found {out!r}.")
    return Request(seed, steps, float(g), side, dcv, tuple(sorted(picked.items())), out, time.perf_counter())


def buckets(max_batch_size: int) -> list[int]:
    """The batch sizes the UNet is run at: powers of two below max_batch_size, and it."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


def bucket_for(n: int, max_batch_size: int) -> int:
    return next(b for b in buckets(max_batch_size) if b >= n)


def find_loras(folder: str | None) -> dict[str, str]:
    if not folder:
        return {}
    return {n[: -len(".safetensors")]: os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.endswith(".safetensors") and LORA_NAME.match(n[: -len(".safetensors")])}


def _png(rgb: torch.Tensor) -> bytes:
    """A PNG of an (H, W, 3) uint8 tensor (zlib and struct only)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[y].flatten().tolist()) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def preview(latent: torch.Tensor) -> bytes:
    """A PNG preview of a (4, h, w) SD latent (the live-preview colour map, 8x nearest upscale): no VAE."""
    rgb = torch.einsum("chw,cr->hwr", latent.float().cpu(), torch.tensor(LATENT_RGB))
    rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return _png(rgb.repeat_interleave(8, 0).repeat_interleave(8, 1))


def encode(latent: torch.Tensor, output: str) -> dict:
    lat = latent.detach().float().cpu().contiguous()
    raw = lat.numpy().tobytes()
    out = {"shape": list(lat.shape), "dtype": "float32", "sha256": hashlib.sha256(raw).hexdigest()}
    if output == "latent":
        out["latent"] = base64.b64encode(raw).decode()
    else:
        out["png"] = base64.b64encode(preview(lat)).decode()
    return out


def decode_latent(item: dict) -> torch.Tensor:
    """The latent tensor of one response (`output: latent`)."""
    import numpy as np

    return torch.from_numpy(np.frombuffer(base64.b64decode(item["latent"]), dtype=np.float32).copy()).reshape(item["shape"])


def compile_counters() -> dict:
    """What this process's torch compiled or found in its caches so far."""
    from torch._dynamo.utils import counters

    return {"fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0), "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
            "autograd_cache_hit": counters["aot_autograd"].get("autograd_cache_hit", 0),
            "autograd_cache_miss": counters["aot_autograd"].get("autograd_cache_miss", 0),
            "graphs": counters["stats"].get("unique_graphs", 0)}


class Pipeline:
    """One replica's model and what it made for it. Not thread-safe: call it from one thread."""

    def __init__(self, cfg: ServeConfig, cache_dir: str | None = None):
        self.cfg = cfg
        self._temp: list[str] = []  # folders this replica made: removed by close()
        if cfg.isolated_torch_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = self._mkdtemp("sd-accel-inductor-")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.inductor_options:  # this process is the replica's own: set for its lifetime
            import torch._inductor.config as inductor_config

            for k, v in cfg.inductor_options.items():
                setattr(inductor_config, k, v)
        self.cache_dir = cfg.cache_dir or cache_dir or self._mkdtemp("sd-accel-serve-cache-")
        self.device = cfg.device
        self.dtype = torch.float16 if cfg.device == "cuda" else torch.float32
        t0 = time.perf_counter()
        self.unet = build_unet(cfg.spec, cfg.seed, cfg.device, self.dtype, cfg.checkpoint)
        self.load_s = time.perf_counter() - t0
        self.loras = find_loras(cfg.lora_dir)
        self.compile_config = CompileConfig(backend="inductor", mode=cfg.mode, cache_dir=self.cache_dir) if cfg.compile else None
        self.compiled = compile(self.unet, self.compile_config) if cfg.compile else None
        self._deepcaches: dict[tuple[int, int], object] = {}
        self.artifacts = "none"  # what happened to the artifacts this replica was handed
        self.served = 0
        self.warmup_s = 0.0

    def _mkdtemp(self, prefix: str) -> str:
        if self.cfg.work_dir:
            os.makedirs(self.cfg.work_dir, exist_ok=True)
        path = tempfile.mkdtemp(prefix=prefix, dir=self.cfg.work_dir)
        self._temp.append(path)
        return path

    def close(self) -> None:
        """Remove the temporary folders this replica made (its compile cache copy)."""
        while self._temp:
            shutil.rmtree(self._temp.pop(), ignore_errors=True)

    # -- artifacts -----------------------------------------------------------------------------
    def import_artifacts(self, data: bytes, source: str = "the artifacts handed out") -> str:
        """Add handed-out compile artifacts to this replica's cache folder; ArtifactsError when unusable."""
        try:
            res = ca.import_bundle(data, self.cache_dir, self.device, source=source)
        except ca.ArtifactsError as e:
            self.artifacts = f"refused: {e}"
            raise
        self.artifacts = res.describe()
        return self.artifacts

    def export_artifacts(self) -> bytes | None:
        """This replica's compiled artifacts as one artifacts file, or None when it has none."""
        try:
            return ca.export_bundle(self.cache_dir, config=self.compile_config)
        except ca.ArtifactsError:
            return None

    # -- sampling ------------------------------------------------------------------------------
    def warm_up(self, progress=None) -> float:
        """One batch of every batch size at the default settings, plainly and with each `warm_deepcache`
        setting: compiles (or loads) what requests will use. `progress(text)` hears each step."""
        t0 = time.perf_counter()
        paths = [None, *(tuple(dc) for dc in self.cfg.warm_deepcache)]
        sizes = buckets(self.cfg.max_batch_size)
        n, total = 0, len(paths) * len(sizes)
        for dc in paths:
            base = Request(0, self.cfg.spec.steps, 7.0, self.cfg.spec.latent, dc, (), "latent")
            for b in sizes:
                n += 1
                if progress is not None:
                    what = f"DeepCache interval {dc[0]} depth {dc[1]}" if dc else "plain UNet"
                    progress(f"warm-up {n}/{total}: {what}, batch {b} ({time.perf_counter() - t0:.0f} s so far)")
                self.run_batch([base] * b)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s

    def _unet_call(self, req: Request):
        if req.deepcache is None:
            module = self.compiled or self.unet
            return None, lambda x, t, c: module(x, t, encoder_hidden_states=c, return_dict=False)[0]
        key = req.deepcache
        dc = self._deepcaches.get(key)
        if dc is None:
            dc = self._deepcaches[key] = deepcache(self.unet, DeepCacheConfig(cache_interval=key[0], cache_depth=key[1]), compile=self.compile_config)
        return dc, lambda x, t, c: dc(x, t, encoder_hidden_states=c, return_dict=False)[0]

    def _inputs(self, req: Request):
        preset = replace(self.cfg.spec, latent=req.side)
        return make_inputs(self.unet, preset, req.steps, req.seed, self.device, self.dtype)

    def _sample(self, reqs: list[Request], bucket: int) -> torch.Tensor:
        """Euler with CFG for requests of one group, padded to `bucket` rows: (len(reqs), 4, side, side)."""
        first = reqs[0]
        inputs = [self._inputs(r) for r in reqs]
        inputs += [inputs[0]] * (bucket - len(reqs))
        x = torch.cat([i.latent for i in inputs])
        ctx = torch.cat([i.context[:1] for i in inputs] + [i.context[1:] for i in inputs]).to(self.dtype)
        sigmas, timesteps = inputs[0].sigmas, inputs[0].timesteps
        dc, call = self._unet_call(first)
        if dc is not None:
            dc.begin(timesteps)
        try:
            for i in range(len(timesteps)):
                sigma = sigmas[i]
                xin = (x / (sigma ** 2 + 1) ** 0.5).to(self.dtype)
                t = timesteps[i].to(x.device).expand(2 * bucket)
                eps = call(torch.cat([xin, xin]), t, ctx).float()
                e_c, e_u = eps.chunk(2)
                x = x + (e_u + first.cfg * (e_c - e_u)) * (sigmas[i + 1] - sigma)
        finally:
            if dc is not None:
                dc.finish()
        return x[: len(reqs)]

    def run_batch(self, reqs: list[Request]) -> list[dict]:
        """Serve a batch: one result dict per request, in order ({"error", "status"} for a refused group)."""
        out: list[dict | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.group, []).append(i)
        for idx in groups.values():
            rs = [reqs[i] for i in idx]
            t0 = time.perf_counter()
            try:
                report = apply_loras(self.unet, [LoraSpec(self.loras[n], s) for n, s in rs[0].loras])
                lora_s = time.perf_counter() - t0
                bucket = bucket_for(len(rs), self.cfg.max_batch_size)
                with torch.inference_mode():
                    t1 = time.perf_counter()
                    lat = self._sample(rs, bucket)
                    if self.device == "cuda":
                        torch.cuda.synchronize()
                    sample_s = time.perf_counter() - t1
            except SDAccelError as e:  # a LoRA file that does not fit the model, ...: this group only
                for i in idx:
                    out[i] = {"error": str(e), "status": 400}
                continue
            self.served += len(rs)
            for j, i in enumerate(idx):
                r = reqs[i]
                timings = {"queue_s": round(t0 - r.received, 4) if r.received else 0.0, "lora_s": round(lora_s, 4),
                           "sample_s": round(sample_s, 4), "ms_per_step": round(sample_s / r.steps * 1000, 3),
                           "batch": len(rs), "bucket": bucket}
                out[i] = {**encode(lat[j], r.output), "timings": timings, "seed": r.seed, "steps": r.steps,
                          "loras": report.summary() if r.loras else "", "deepcache": list(r.deepcache) if r.deepcache else None}
        return out  # type: ignore[return-value]

    def info(self) -> dict:
        return {"preset": self.cfg.preset, "checkpoint": self.cfg.checkpoint, "device": self.device, "compile": self.cfg.compile,
                "compile_report": self.compiled.report.summary() if self.compiled is not None else "",
                "artifacts": self.artifacts, "counters": compile_counters(), "warmup_s": round(self.warmup_s, 3),
                "served": self.served, "loras": sorted(self.loras), "cache_dir": self.cache_dir, "pid": os.getpid()}


__all__ = ["ServeConfig", "Request", "RequestError", "Pipeline", "parse_request", "buckets", "bucket_for", "encode", "decode_latent",
           "preview", "compile_counters", "find_loras", "MICRO", "SERVE_PRESETS"]
