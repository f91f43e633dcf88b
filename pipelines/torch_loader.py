"""The torch fallback: DataLoader workers read samples by index from the source (for shards: one
pread each, the shard indexes give the offsets), decode them with Pillow no further down than the
patch's last row (pipelines/regions.py; raw and latent: no decode, and of raw samples only the
patch's rows are read) and crop. Used where DALI is missing. Image patches are handed over as uint8 HWC;
latent samples are
cropped in their stored float type and handed over as float32 CHW.

The sampler walks the plan (pipelines/order.py) and hands each step to the workers in chunks; the
main process joins the chunks of a step in order. No shuffling happens inside the DataLoader, so the
output does not depend on the number of workers and resuming needs only the images seen.

A damaged sample (a checksum of what was read fails: data, rows or label; or Pillow cannot decode it)
is replaced in the worker
by the next good one and reported with the chunk; the pipeline applies ``data.on_corrupt`` when the
step is delivered (pipelines/corrupt.py).
"""
from __future__ import annotations

from collections import deque
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pdiff.pipelines.base import PatchPipeline
from pdiff.pipelines.corrupt import Replaced, read_checked
from pdiff.pipelines.order import RankStep
from pdiff.pipelines.sample_source import UNIFORM_ENCODINGS, SampleSource


def read_patches(source: SampleSource, indices: np.ndarray, read_xy: np.ndarray, patch_size: int,
                 known: Mapping[int, str] = {}) -> tuple[np.ndarray, list[Replaced]]:
    """(n, s, s, C) in the stored type (uint8 images, float16/float32 latents): sample indices[j]
    cropped at read_xy[j] = (x0, y0), each read or decoded no further than the crop needs, or the
    sample that replaced a damaged one (listed; ``known``: samples already known to be damaged, as
    for `read_checked`)."""
    s = patch_size
    out = np.empty((len(indices), s, s, source.channels), source.dtype)
    replaced: list[Replaced] = []
    uniform = source.encoding in UNIFORM_ENCODINGS
    for j, (i, (x, y)) in enumerate(zip(indices, read_xy)):
        x, y = int(x), int(y)
        if uniform:                     # straight into the batch: only the patch's rows are read
            read_checked(source, int(i), j, lambda k: source.read_region(k, x, y, s, out[j]), replaced, known)
        else:
            out[j] = read_checked(source, int(i), j, lambda k: source.decode_region(k, x, y, s), replaced, known)
    return out, replaced


class _ChunkReader(Dataset):
    """Decodes and crops a chunk of a step: uint8 HWC image patches as decoded (the training step
    normalizes them on the device), float32 CHW latent patches."""

    def __init__(self, source: SampleSource):
        self.source = source

    def __getitem__(self, key):
        step_images_seen, chunk, n_chunks, s, indices, read_xy = key
        patches, replaced = read_patches(self.source, indices, read_xy, s)
        if self.source.encoding == "latent":           # values as stored: HWC -> CHW, float16 -> float32 is exact
            patches = patches.transpose(0, 3, 1, 2).astype(np.float32)
        return step_images_seen, chunk, n_chunks, torch.from_numpy(patches), replaced

    def __len__(self):
        raise TypeError("endless dataset")


class _StepSampler(Sampler):
    def __init__(self, pipe: "TorchPatchPipeline", images_seen: int):
        self.pipe, self.images_seen = pipe, images_seen

    def __iter__(self):
        for step in self.pipe.plan.steps(self.images_seen):
            self.pipe._pending.append(step)
            b = len(step.indices)
            size = self.pipe.chunk_size
            n = -(-b // size)
            for c in range(n):
                sl = slice(c * size, (c + 1) * size)
                yield step.images_seen, c, n, step.patch_size, step.indices[sl], step.read_xy[sl]


class TorchPatchPipeline(PatchPipeline):
    backend = "torch"

    def __init__(self, cfg, schedule, rank, world_size, device, source):
        super().__init__(cfg, schedule, rank, world_size, device, source)
        # Raw and latent samples need no decode: reading and cropping them in this process beats
        # shipping them through worker queues (measured for raw: about 10x on 2 cores).
        self.workers = 0 if source.encoding in UNIFORM_ENCODINGS else max(0, int(cfg.data.workers))
        # Split a step over the workers so that one step is decoded in parallel.
        self.chunk_size = max(16, -(-self.plan.max_per_rank // max(1, 2 * self.workers)))
        self._pending: deque[RankStep] = deque()
        self._iter = None

    def _start(self, images_seen: int) -> None:
        self._pending.clear()
        kwargs = {}
        if self.workers:
            kwargs = dict(num_workers=self.workers, prefetch_factor=max(1, int(self.cfg.data.prefetch)),
                          persistent_workers=False)
        loader = DataLoader(_ChunkReader(self.source), sampler=_StepSampler(self, images_seen), batch_size=None,
                            pin_memory=self.device.type == "cuda", **kwargs)
        self._iter = iter(loader)

    def _next_step(self):
        parts, replaced = [], []
        while True:
            step_images_seen, chunk, n_chunks, patches, chunk_replaced = next(self._iter)
            parts.append(patches)
            for r in chunk_replaced:            # rows of the chunk -> rows of the step
                r.row += chunk * self.chunk_size
            replaced += chunk_replaced
            if chunk == n_chunks - 1:
                break
        step = self._pending.popleft()
        if step.images_seen != step_images_seen:
            raise RuntimeError("torch pipeline: chunks arrived out of order")
        return step, parts[0] if len(parts) == 1 else torch.cat(parts), replaced

    def _stop(self) -> None:
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._pending.clear()
