"""Artifacts files: one cache folder's compile artifacts, shipped to other machines (a fleet).

`export_bundle` packs a folder's files of one fingerprint (see compile_cache) into one artifacts
file, with the fingerprint, the compile configs that made it and a checksum per member;
`import_bundle` checks that file against this machine (torch, Python, GPU, Triton) and writes
its members into a cache folder, where the host's next compiled run loads them as if it had
compiled them itself. A file from another torch or GPU, or a damaged one, raises ArtifactsError
(expected / found / what to do) and writes nothing, so the worker compiles as usual.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field

import torch

from . import compile_cache as cc
from .errors import SDAccelError
from .log import logger, plural

BUNDLE_MAGIC = b"SDACCEL-COMPILE-ARTIFACTS 1\n"
BUNDLE_EXT = ".sdca"


class ArtifactsError(SDAccelError):
    """An artifacts file that cannot be used here (damaged, or made with another torch / GPU)."""


def _describe_fp(fp: dict) -> str:
    text = f"torch {fp.get('torch')}, Python {fp.get('python')} on {fp.get('device')}"
    return text + (f" (triton {fp['triton']})" if fp.get("triton") else "")


@dataclass
class Bundle:
    """A read artifacts file: its header and its members, each (cache-file header, payload)."""

    header: dict
    members: list[tuple[dict, bytes]]

    @property
    def fingerprint(self) -> dict:
        return self.header.get("fingerprint", {})

    @property
    def artifacts(self) -> int:
        return len({(t, k) for h, _ in self.members for t, ks in h.get("artifacts", {}).items() for k in ks})

    @property
    def configs(self) -> list[dict]:
        return self.header.get("compile", [])

    def describe(self) -> str:
        size = sum(len(p) for _, p in self.members)
        confs = "; ".join(", ".join(f"{k}={v}" for k, v in c.items()) for c in self.configs) or "not recorded"
        return (f"{plural(self.artifacts, 'artifact')} in {plural(len(self.members), 'member')} ({size / 2 ** 20:.1f} MB), made with "
                f"{_describe_fp(self.fingerprint)}; compile config: {confs}")


def _fid_of(path: str) -> str:
    """The fingerprint id a cache file's name starts with (`<id>.<content hash>.sdcc`)."""
    return os.path.basename(path)[: -len(cc.EXT)].rsplit(".", 1)[0]


def _pick_fingerprint(files: list[cc.Entry], fid: str | None, folder_path: str) -> str:
    ids = sorted({_fid_of(e.path) for e in files})
    if fid is not None:
        matches = [i for i in ids if i.startswith(fid)]
        if len(matches) != 1:
            raise ArtifactsError(f"SD Accel: no single set of compile-cache files in {folder_path} matches {fid!r}; expected one of: "
                                 f"{', '.join(ids) or 'none'}. Give one of those (or its start) as --fingerprint.")
        return matches[0]
    if len(ids) == 1:
        return ids[0]
    here = {cc.fingerprint_id(cc.fingerprint("cpu"))}
    if torch.cuda.is_available():
        here.add(cc.fingerprint_id(cc.fingerprint("cuda")))
    local = [i for i in ids if i in here]
    if len(local) == 1:
        return local[0]
    raise ArtifactsError(f"SD Accel: {folder_path} holds compile-cache files of {len(ids)} torch/GPU combinations ({', '.join(ids)}) and "
                         "none of them is this machine's; expected one. Pick one with --fingerprint.")


def export_bundle(path: str, fid: str | None = None, config=None) -> bytes:
    """The artifacts file (bytes) for the cache files of one fingerprint in folder `path`.

    `fid`: a fingerprint id (or its start) when the folder holds several; by default the
    folder's only one, else this machine's. `config`: a CompileConfig to record besides the ones
    the files name. Raises ArtifactsError when there is nothing to export.
    """
    files = [e for e in cc.entries(path) if e.header is not None]
    if not files:
        raise ArtifactsError(f"SD Accel: no compile-cache files in {path} to export; expected the files a compiled run leaves there. "
                             "Run a compiled generation first (Compile UNet with the inductor backend, or `sd-accel bench --configs inductor`), or give the folder it used (--dir).")
    chosen = _pick_fingerprint(files, fid, path)
    members, listed, configs = [], [], []
    for e in files:
        if _fid_of(e.path) != chosen:
            continue
        try:
            header, payload = cc.read_file(e.path)
        except (OSError, ValueError, struct.error) as ex:
            logger.warning("SD Accel: left unreadable compile-cache file %s out of the export (%s)", e.path, ex)
            continue
        members.append(payload)
        listed.append({"header": header, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
        if header.get("compile") and header["compile"] not in configs:
            configs.append(header["compile"])
    if cc.config_record(config) and cc.config_record(config) not in configs:
        configs.append(cc.config_record(config))
    head = {"format": 1, "fingerprint": listed[0]["header"]["fingerprint"], "created": time.time(), "compile": configs, "members": listed}
    blob = json.dumps(head, sort_keys=True).encode()
    return BUNDLE_MAGIC + struct.pack("<Q", len(blob)) + blob + b"".join(members)


def write_bundle(path: str, data: bytes) -> None:
    """Write an artifacts file atomically (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_bundle(data: bytes, source: str = "the artifacts file") -> Bundle:
    """Parse and verify an artifacts file (or one compile-cache file); ArtifactsError when damaged."""
    todo = "Export it again (`sd-accel cache export FILE` on the machine that compiled) and copy it whole; this worker compiles as usual."
    if data.startswith(cc.MAGIC):  # a single compile-cache file from a folder is accepted as it is
        try:
            r = _Reader(data)
            if len(data) < len(cc.MAGIC) + 8:
                raise ValueError(f"it ends after its first line ({len(data)} bytes); expected the header's length and the artifacts after it")
            header = cc.read_header(r)
            payload = data[r.at:]
            if not isinstance(header, dict) or "fingerprint" not in header:
                raise ValueError("its header names no fingerprint")
        except (ValueError, struct.error) as e:
            raise ArtifactsError(f"SD Accel: {source} is a damaged compile-cache file ({e}). {todo}") from None
        return Bundle({"format": 1, "fingerprint": header.get("fingerprint", {}), "compile": [header["compile"]] if header.get("compile") else []},
                      [(header, payload)])
    if not data.startswith(BUNDLE_MAGIC):
        raise ArtifactsError(f"SD Accel: {source} is not an SD Accel artifacts file (expected it to start with {BUNDLE_MAGIC[:-1].decode()!r}, "
                             f"found {data[:24]!r}). Give a file written by `sd-accel cache export`; this worker compiles as usual.")
    try:
        at = len(BUNDLE_MAGIC)
        if len(data) < at + 8:  # a header line and nothing after it: cut off
            raise ValueError(f"it ends after its first line ({len(data)} bytes); expected the header's length and the artifacts after it")
        (n,) = struct.unpack_from("<Q", data, at)
        at += 8
        if n > 64 * 2 ** 20 or at + n > len(data):
            raise ValueError(f"its header claims {n} bytes, the file has {len(data) - at}")
        header = json.loads(data[at:at + n])
        at += n
        members = []
        for i, m in enumerate(header["members"]):
            payload = data[at:at + m["size"]]
            if len(payload) != m["size"]:
                raise ValueError(f"member {i + 1} of {len(header['members'])} is cut short ({len(payload)} of {m['size']} bytes): the file is truncated")
            if hashlib.sha256(payload).hexdigest() != m["sha256"]:
                raise ValueError(f"member {i + 1} of {len(header['members'])} does not match its checksum")
            members.append((m["header"], payload))
            at += m["size"]
        if at != len(data):
            raise ValueError(f"{len(data) - at} bytes follow the last member")
        header["fingerprint"]["torch"]  # noqa: B018 (a header without it is damaged)
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise ArtifactsError(f"SD Accel: {source} is damaged ({e}). {todo}") from None
    return Bundle(header, members)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def read(self, n: int) -> bytes:
        out = self.data[self.at:self.at + n]
        self.at += n
        return out


def check_bundle(bundle: Bundle, device: torch.device | str | None = None, source: str = "the artifacts file") -> dict:
    """This machine's fingerprint when `bundle` was made on a machine like it; else ArtifactsError.

    `device`: where the worker runs (default: the bundle's kind: the CPU, or CUDA device 0)."""
    theirs = bundle.fingerprint
    if device is None:
        device = "cpu" if theirs.get("device") == "cpu" else "cuda"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactsError(f"SD Accel: {source} was made with {_describe_fp(theirs)}; this worker has no CUDA GPU (torch {torch.__version__}). "
                             "Use it on a worker with that GPU, or export artifacts on a machine like this one; this worker compiles as usual.")
    ours = cc.fingerprint(device)
    if ours != theirs:
        diff = ", ".join(f"{k} {theirs.get(k)!r} here {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k))
        raise ArtifactsError(f"SD Accel: {source} was made with {_describe_fp(theirs)}; this worker has {_describe_fp(ours)} ({diff}). "
                             "Compiled code only fits the torch, Python, Triton and GPU it was made with; this worker compiles as usual. "
                             "Export the artifacts on a machine like this one (`sd-accel cache export FILE` after a compiled run).")
    return ours


@dataclass
class ImportResult:
    folder: str
    written: list[str] = field(default_factory=list)
    present: int = 0  # members the folder already had
    artifacts: int = 0
    loaded_now: int = 0  # artifacts put into torch's caches at once (the folder was loaded earlier in this process)

    def describe(self) -> str:
        text = f"imported {self.artifacts} artifacts: {plural(len(self.written), 'new file')} in {self.folder}"
        if self.present:
            text += f", {self.present} already there"
        if self.loaded_now:
            text += f"; {self.loaded_now} loaded into this process"
        return text


def import_bundle(data: bytes, path: str, device: torch.device | str | None = None, source: str = "the artifacts file") -> ImportResult:
    """Check an artifacts file against this machine and write its members into cache folder `path`.

    A host's next compiled run in a new process loads them from there. When this process loaded
    `path` already (its first compiled call has passed), the new members are also loaded into
    torch's caches now. Raises ArtifactsError (and writes nothing) for a damaged file or one made
    with another torch / Python / Triton / GPU.
    """
    bundle = read_bundle(data, source)
    fp = check_bundle(bundle, device, source)
    fid = cc.fingerprint_id(fp)
    f = cc.folder(path)
    res = ImportResult(f.path, artifacts=bundle.artifacts)
    os.makedirs(f.path, exist_ok=True)
    with f.lock:
        for header, payload in bundle.members:
            target = os.path.join(f.path, f"{fid}.{hashlib.sha256(payload).hexdigest()[:16]}{cc.EXT}")
            if os.path.exists(target):
                res.present += 1
                continue
            cc.write_file(target, dict(header, imported=time.time()), payload)
            res.written.append(target)
            if fid in f.loaded and cc.supported():
                info = cc.load_payload(payload)
                if info is not None:
                    keys = {(t, k) for t, ks in info.artifacts.items() for k in ks}
                    f.known |= keys
                    res.loaded_now += len(keys)
    logger.info("SD Accel: compile cache %s", res.describe())
    return res


__all__ = ["ArtifactsError", "Bundle", "ImportResult", "export_bundle", "write_bundle", "read_bundle", "check_bundle", "import_bundle"]
