"""DeepCache's kept features: a whole-feature cut's tensors per cond chunk, from the last two full steps.

The step cache's run (`stepcache.StepCacheRun.kept`) holds one; DeepCache's runner (`deepcaching.py`)
stores the up-path feature there at a full step and looks it up at the cached ones.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .log import logger


class KeptFeatures:
    """A whole-feature cut's kept tensors (DeepCache's up-path feature), per cond chunk, from the
    last two full steps (the older one for forecast).

    `store` keeps a batch of chunks (equal slices in order) captured at a full step; `lookup`
    serves them back, re-sliced when the host batches the chunks differently on a later step
    (ComfyUI batches cond/uncond by free memory). A change of shape, dtype or device drops all.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self._gens: list[dict] = []  # newest first, at most two: {"step", "whole": {keys: h}, "chunks": {key: h}}
        self._meta = None

    @property
    def last_full_step(self) -> int | None:
        return self._gens[0]["step"] if self._gens else None

    def step_of(self, age: int) -> int | None:
        return self._gens[age]["step"] if len(self._gens) > age else None

    def check_metadata(self, x: torch.Tensor) -> None:
        meta = (x.device, x.dtype, tuple(x.shape[1:]))
        if self._meta is not None and meta != self._meta:
            logger.info("SD Accel: input shape, dtype or device changed; dropping the kept features.")
            self.clear()
        self._meta = meta

    def store(self, keys: Sequence, h: torch.Tensor, step: int) -> None:
        """Keep `h` (the batch of chunks `keys`, equal slices in order) as captured at full step `step`."""
        keys = tuple(keys)
        if self.last_full_step != step:
            self._gens = [{"step": step, "whole": {}, "chunks": {}}] + self._gens[:1]
        gen = self._gens[0]
        gen["whole"][keys] = h
        per = h.shape[0] // len(keys) if keys and h.shape[0] % len(keys) == 0 else None
        for i, k in enumerate(keys):
            if per is not None:
                gen["chunks"][k] = h[i * per:(i + 1) * per]
            else:
                gen["chunks"].pop(k, None)

    def lookup(self, keys: Sequence, batch: int, age: int = 0) -> torch.Tensor | None:
        """The kept feature for these chunks from the latest full step (`age` 1: the one before), or None."""
        if len(self._gens) <= age:
            return None
        gen, keys = self._gens[age], tuple(keys)
        h = gen["whole"].get(keys)
        if h is not None and h.shape[0] == batch:
            return h
        parts = [gen["chunks"].get(k) for k in keys]
        if not parts or any(t is None for t in parts):
            return None
        h = torch.cat(parts) if len(parts) > 1 else parts[0]
        return h if h.shape[0] == batch else None


__all__ = ["KeptFeatures"]
