"""Persist torch.compile's caches in a folder of our own, so a later process compiles from them.

Mechanism: torch's portable "mega cache". `torch.compiler.save_cache_artifacts()` serialises
every cache artifact this process has recorded since it started (FX graph / inductor
entries with their Triton kernels, AOTAutograd entries, autotune results, PGO profiles);
`torch.compiler.load_cache_artifacts(bytes)` writes them into torch's own local caches, where
the next compilation of the same graph finds them (an FX graph cache hit instead of inductor
lowering and kernel compilation). Nothing process-wide is configured: torch keeps using its
own cache folder (TORCHINDUCTOR_CACHE_DIR or its default); we only carry artifacts across.

What torch's API does, and how the folder is laid out because of it:
- save returns *everything recorded since process start*, not what is new since the last save
  (`CacheArtifactManager.serialize` appends to one growing buffer). A cache *hit* records the
  entry it hit again (`record_if_present` in FxGraphCache / AOTAutogradCache lookups); a load
  records nothing.
- Loading a payload saved in several steps needs care (see `load_payload`).
- So each save writes one file holding all of this process's artifacts, named by a content
  hash, with a small header listing the artifact keys. A save whose keys are all in files we
  loaded or saved already writes nothing (the warm process that only hit the cache). After a
  write, files of the same fingerprint whose keys the new file covers are deleted, so a
  process that loaded A and compiled one more shape leaves one file, while one that compiled
  only other shapes adds its file next to A instead of replacing it. A size cap removes the
  least recently used files (load touches the files it used).
- Files carry a fingerprint (torch, Python, device name, Triton for CUDA) in their name; other
  torch builds or GPUs ignore them. torch also checks versions in its own keys.

On the CPU the artifacts hold inductor's generated C++ source, not the compiled library, so a
warm process still runs the C++ compiler; on CUDA they carry the compiled Triton kernels.
Dynamo still traces the Python code in every process, and reduce-overhead still records its
CUDA graphs: those are not cacheable across processes.

Shipping these files to other machines (a fleet of workers) is cache_artifacts' job.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from .log import logger

ENV = "SD_ACCEL_COMPILE_CACHE"  # a folder, or "off" / "0" to switch persistence off
OFF_VALUES = ("off", "0", "false", "no", "none")
SUBDIR = os.path.join("sd_accel", "compile_cache")
EXT = ".sdcc"
MAGIC = b"SDACCEL-COMPILE-CACHE 1\n"
MAX_BYTES = 4 * 2 ** 30  # one SDXL reduce-overhead entry set is O(100 MB); keep many
# The CompileConfig fields that shape what inductor compiles (recorded in the files, for people).
CONFIG_FIELDS = ("backend", "mode", "dynamic", "fullgraph", "guards", "method")


# --- where --------------------------------------------------------------------------------------

def default_cache_dir(host: str | None = None) -> str | None:
    """The folder for `host` ("comfy", "webui" or None), or None when persistence is switched off.

    $SD_ACCEL_COMPILE_CACHE overrides it (a path, or "off"/"0"). ComfyUI: its user directory
    (`<ComfyUI>/user/sd_accel/compile_cache`), not its temp directory, which ComfyUI's main.py
    deletes at every start (`cleanup_temp()`, 0.3.64 and 0.8.0). webui/Forge: the webui's cache
    folder (`<data dir>/cache`, or $SD_WEBUI_CACHE_DIR, as modules/cache.py picks it).
    Otherwise $XDG_CACHE_HOME or ~/.cache.
    """
    env = os.environ.get(ENV, "").strip()
    if env:
        return None if env.lower() in OFF_VALUES else os.path.abspath(os.path.expanduser(env))
    base = None
    if host == "comfy":
        try:
            import folder_paths

            base = folder_paths.get_user_directory()
        except Exception as e:  # outside ComfyUI, or a ComfyUI without it
            logger.debug("SD Accel: no ComfyUI user directory (%s); using the user cache folder", e)
    elif host == "webui":
        try:
            from modules import paths_internal

            base = os.environ.get("SD_WEBUI_CACHE_DIR", os.path.join(paths_internal.data_path, "cache"))
        except Exception as e:
            logger.debug("SD Accel: no webui data path (%s); using the user cache folder", e)
    if base is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), SUBDIR)


def load_payload(payload: bytes):
    """`torch.compiler.load_cache_artifacts`, but keeping every chunk of a payload saved in steps.

    save_cache_artifacts appends one (type, artifacts) chunk per type at every call, and
    load_cache_artifacts turns the chunk list into a dict, so a type saved twice (a process
    that compiled, saved, then recompiled a new size and saved again) loses all but its last
    chunk (torch 2.11 and 2.13: `dict(AppendingByteSerializer.to_list(...))`). Merge the chunks
    with torch's own readers; where those moved, use the public call.
    """
    try:
        from collections import defaultdict

        from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer

        CacheArtifactManager._ensure_cache_artifacts_registered()
    except (ImportError, AttributeError):
        return torch.compiler.load_cache_artifacts(payload)
    merged = defaultdict(list)
    for kind, artifacts in AppendingByteSerializer.to_list(payload, deserialize_fn=_deserialize_single_cache):
        merged[kind].extend(artifacts)
    return CacheArtifactManager.populate_caches(merged)


@functools.lru_cache(maxsize=None)
def supported() -> bool:
    """Whether this torch can save and load portable compile caches (probed once, one log line if not)."""
    ok = all(hasattr(torch.compiler, f) for f in ("save_cache_artifacts", "load_cache_artifacts"))
    if not ok:
        logger.info("SD Accel: torch %s has no torch.compiler.save_cache_artifacts (torch 2.6+); compiled UNets "
                    "are compiled again in every new process.", torch.__version__)
    return ok


# --- fingerprint ----------------------------------------------------------------------------------

def fingerprint(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    fp = {"torch": torch.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "device": device.type}
    if device.type == "cuda":
        fp["device"] = torch.cuda.get_device_name(device)
        try:
            from importlib.metadata import version

            fp["triton"] = version("triton")
        except Exception:
            pass
    return fp


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+]+", "_", text).strip("_")[:40]


def fingerprint_id(fp: dict) -> str:
    """File-name prefix: readable parts plus a hash of the whole fingerprint."""
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:8]
    return f"torch{_slug(fp['torch'])}-py{fp['python']}-{_slug(fp['device'])}-{digest}"


# --- files ----------------------------------------------------------------------------------------

@dataclass
class Entry:
    path: str
    size: int
    mtime: float
    header: dict | None  # None: not readable as one of our files

    @property
    def keys(self) -> set[tuple[str, str]]:
        arts = (self.header or {}).get("artifacts", {})
        return {(t, k) for t, ks in arts.items() for k in ks}


def write_file(path: str, header: dict, payload: bytes) -> None:
    head = json.dumps(header, sort_keys=True).encode()
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(head)) + head + payload)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_header(f) -> dict:
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError("not an SD Accel compile-cache file")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 64 * 2 ** 20:
        raise ValueError("header too large")
    return json.loads(f.read(n))


def read_file(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        header = read_header(f)
        return header, f.read()


def entries(folder: str, fid: str | None = None) -> list[Entry]:
    """Our cache files in `folder` (all fingerprints, or only `fid`'s), oldest first."""
    out = []
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    for name in names:
        if not name.endswith(EXT) or (fid and not name.startswith(fid + ".")):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
            try:
                with open(path, "rb") as f:
                    header = read_header(f)
            except (ValueError, OSError, struct.error):
                header = None
            out.append(Entry(path, st.st_size, st.st_mtime, header))
        except OSError:  # removed by another process meanwhile
            continue
    return sorted(out, key=lambda e: e.mtime)


def clear(folder: str) -> int:
    """Delete our cache files in `folder` (every fingerprint); returns how many."""
    n = 0
    for e in entries(folder):
        try:
            os.remove(e.path)
            n += 1
        except OSError:
            pass
    return n


def enforce_cap(folder: str, max_bytes: int = MAX_BYTES, keep: str | None = None) -> list[str]:
    """Delete least recently used files until the folder's files fit in `max_bytes`; never `keep`."""
    files = entries(folder)
    total = sum(e.size for e in files)
    removed = []
    for e in files:
        if total <= max_bytes:
            break
        if e.path == keep:
            continue
        try:
            os.remove(e.path)
        except OSError:
            continue
        total -= e.size
        removed.append(e.path)
    return removed


# --- per-process state ----------------------------------------------------------------------------

@dataclass
class LoadResult:
    folder: str
    artifacts: int = 0
    files: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    earlier: bool = False  # loaded by an earlier call in this process

    def describe(self) -> str:
        if self.earlier:
            return f"{self.artifacts} artifacts loaded earlier in this process from {self.folder}"
        text = f"loaded {self.artifacts} artifacts ({self.files} files, {self.seconds:.1f}s) from {self.folder}" if self.files else f"empty: {self.folder}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable"
        return text


@dataclass
class SaveResult:
    new: int = 0
    path: str | None = None
    size: int = 0
    removed: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        if self.error:
            return f"not saved ({self.error})"
        if not self.path:
            return "nothing new to save"
        return f"saved {self.new} new artifacts ({self.size / 2 ** 20:.1f} MB, {self.seconds:.1f}s)"


class CacheFolder:
    """One folder, per process: loaded once per fingerprint; knows which artifacts it holds."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.loaded: dict[str, LoadResult] = {}  # fingerprint id -> what the load found
        self.known: set[tuple[str, str]] = set()  # (type, key) in files we loaded or wrote
        self.saves = 0


class CacheFolders:
    """This process's CacheFolder per path (what it loaded and knows). The one instance is FOLDERS."""

    def __init__(self):
        self._by_path: dict[str, CacheFolder] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> CacheFolder:
        path = os.path.abspath(path)
        with self._lock:
            if path not in self._by_path:
                self._by_path[path] = CacheFolder(path)
            return self._by_path[path]

    def forget(self) -> None:
        """Forget every folder's state (as a new process would start)."""
        with self._lock:
            self._by_path.clear()


FOLDERS = CacheFolders()


def folder(path: str) -> CacheFolder:
    return FOLDERS.get(path)


def load(path: str, device: torch.device | str = "cpu") -> LoadResult:
    """Load every cache file of this torch/device fingerprint in `path` into torch's caches.

    Once per process and fingerprint; later calls return what the first found. An unreadable
    file is skipped with a warning; nothing here raises.
    """
    f = folder(path)
    fid = fingerprint_id(fingerprint(device))
    with f.lock:
        if fid in f.loaded:
            prev = f.loaded[fid]
            return LoadResult(f.path, prev.artifacts, prev.files, 0.0, [], earlier=True)
        res = LoadResult(f.path)
        f.loaded[fid] = res
        if not supported():
            return res
        t0 = time.perf_counter()
        for e in entries(f.path, fid):
            try:
                header, payload = read_file(e.path)
                info = load_payload(payload)
                if info is None:  # torch logged why (it could not un-pickle the payload)
                    raise ValueError("torch could not read the artifacts")
            except Exception as ex:
                res.skipped.append(e.path)
                logger.warning("SD Accel: skipped compile-cache file %s (%s: %s); it will be compiled again. "
                               "`sd-accel cache --clear --dir %s` removes the folder's files.", e.path, type(ex).__name__, ex, f.path)
                continue
            keys = {(t, k) for t, ks in info.artifacts.items() for k in ks}
            f.known |= keys
            res.artifacts += len(keys)
            res.files += 1
            try:
                os.utime(e.path)  # least recently used goes first under the size cap
            except OSError:
                pass
        res.seconds = time.perf_counter() - t0
        if res.files:
            logger.info("SD Accel: compile cache %s", res.describe())
        return res


def config_record(config) -> dict | None:
    """The fields of a CompileConfig that shape the compiled code, as a plain dict (None: unknown)."""
    if config is None:
        return None
    return {k: getattr(config, k) for k in CONFIG_FIELDS if hasattr(config, k)}


def save(path: str, device: torch.device | str = "cpu", max_bytes: int = MAX_BYTES, config=None) -> SaveResult:
    """Write what this process compiled to `path` when it holds anything not there yet. Never raises.

    `config` (the CompileConfig that compiled it) is recorded in the file's header."""
    if not supported():
        return SaveResult(error="this torch cannot save compile caches")
    f = folder(path)
    t0 = time.perf_counter()
    try:
        with f.lock:
            out = torch.compiler.save_cache_artifacts()
            if out is None:
                return SaveResult()
            payload, info = out
            keys = {(t, k) for t, ks in info.artifacts.items() for k in ks}
            new = keys - f.known
            if not new:
                return SaveResult()
            fp = fingerprint(device)
            fid = fingerprint_id(fp)
            os.makedirs(f.path, exist_ok=True)
            target = os.path.join(f.path, f"{fid}.{hashlib.sha256(payload).hexdigest()[:16]}{EXT}")
            header = {"fingerprint": fp, "created": time.time(), "artifacts": {t: list(ks) for t, ks in info.artifacts.items()}}
            if config_record(config):
                header["compile"] = config_record(config)
            write_file(target, header, payload)
            f.known |= keys
            f.saves += 1
            res = SaveResult(new=len(new), path=target, size=os.path.getsize(target))
            for e in entries(f.path, fid):
                # Everything an older file holds is in the new one (this process loaded and hit it).
                if e.path != target and e.header is not None and e.keys <= keys:
                    try:
                        os.remove(e.path)
                        res.removed.append(e.path)
                    except OSError:
                        pass
            res.removed += enforce_cap(f.path, max_bytes, keep=target)
            res.seconds = time.perf_counter() - t0
            logger.info("SD Accel: compile cache %s to %s", res.describe(), target)
            return res
    except Exception as e:  # a full disk or a read-only folder must not fail the user's run
        logger.warning("SD Accel: could not save the compile cache to %s (%s: %s); the next process compiles again.", f.path, type(e).__name__, e)
        return SaveResult(error=f"{type(e).__name__}: {e}")



def graphs_compiled() -> int:
    """Dynamo graphs compiled (or loaded from a cache) in this process: when it moves, there may be something to save."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)


__all__ = ["default_cache_dir", "load", "save", "clear", "entries", "enforce_cap", "fingerprint", "fingerprint_id",
           "supported", "graphs_compiled", "CacheFolder", "LoadResult", "SaveResult", "ENV", "MAX_BYTES",
           "config_record"]
