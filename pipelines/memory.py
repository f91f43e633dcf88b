"""The in-memory dataset mode (``data.cache = host | device``): every sample is read, checked and
decoded once, into one (N, R, R, C) tensor (uint8 images, or the latents' stored float type) in host
memory (pinned when the patches go to a GPU) or on the training device; each step is then one gather
of the plan's crops, with no loader left in the step.

The plan, the flips, the state and the guards are the streaming pipelines' (pipelines/base.py), so
the patches are bit for bit the streaming torch backend's (the samples are decoded by the source,
with Pillow, as that backend decodes them; DALI's JPEG decoders may round differently), a run can
resume with or without the cache, and W ranks read what one process reads. Each rank holds its own
copy. A dataset that does not fit is refused before loading, with the size needed and the memory
available. Every sample is read whole, so each (data and label member) is held against its CRC-32s
once, at loading; a damaged one is treated as the streaming loaders treat it, when a step draws it
(data.on_corrupt).
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pdiff.pipelines.base import PatchPipeline
from pdiff.pipelines.corrupt import read_checked
from pdiff.pipelines.sample_source import UNIFORM_ENCODINGS, CorruptSample, SampleSource, SourceError

# Share of the free memory the decoded dataset may take: the rest stays for the training step (on
# the device: activations and the optimizer's buffers; on the host: the process and the loader).
DEVICE_SHARE = 0.8
HOST_SHARE = 0.8
CHUNK = 4096                       # samples decoded and moved per round


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_available_bytes(device: torch.device) -> int:
    return int(torch.cuda.mem_get_info(device)[0])


def _gb(n: float) -> str:
    """Bytes for a person: 16.1 GB, 227.3 MB, 28.4 kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} bytes"


def check_fits(source: SampleSource, where: str, device: torch.device, local_processes: int = 1) -> int:
    """The decoded dataset's size in bytes, or a SourceError saying it does not fit ``where``."""
    itemsize = np.dtype(source.dtype).itemsize
    need = source.count * source.resolution ** 2 * source.channels * itemsize
    what = (f"{source.count:,} samples of {source.resolution}x{source.resolution}x{source.channels} "
            f"{np.dtype(source.dtype).name}")
    if where == "device" and device.type == "cuda":
        free = device_available_bytes(device)
        if need > DEVICE_SHARE * free:
            raise SourceError(
                f"data.cache=device: the dataset needs {_gb(need)} decoded ({what}) but {device} has {_gb(free)} "
                f"free, of which {DEVICE_SHARE:.0%} ({_gb(DEVICE_SHARE * free)}) may hold data (the rest is for the "
                f"training step); use data.cache=host (pinned host memory) or data.cache=none (streaming)")
        return need
    free = host_available_bytes()
    total = need * local_processes
    if total > HOST_SHARE * free:
        per = (f" per process, {_gb(total)} for the {local_processes} processes on this node,"
               if local_processes > 1 else "")
        raise SourceError(
            f"data.cache={where}: the dataset needs {_gb(need)} decoded ({what}){per} but the host has "
            f"{_gb(free)} available, of which {HOST_SHARE:.0%} ({_gb(HOST_SHARE * free)}) may hold data; "
            f"use data.cache=none (streaming)"
            + (" or data.cache=device" if where == "host" and device.type == "cuda" else ""))
    return need


def load_samples(source: SampleSource, out: torch.Tensor, workers: int) -> dict[int, str]:
    """Every sample of ``source``, decoded (and checked by the source as it reads: its CRC-32, its
    decode), into ``out`` (N, R, R, C) on any device: decoded by ``workers`` threads into a host chunk
    (Pillow and the reads release the GIL), then copied into place. Returns the damaged samples
    (index -> the source's message); their slots hold zeros."""
    n = source.count
    host = out.device.type == "cpu"
    staging = None if host else torch.empty((min(CHUNK, n), *out.shape[1:]), dtype=out.dtype, pin_memory=True)
    damaged: dict[int, str] = {}

    def fill(dst: np.ndarray, i: int) -> None:
        try:
            if source.encoding in UNIFORM_ENCODINGS:
                source.read_into(i, dst)
            else:
                dst[...] = source.decode(i)
        except CorruptSample as e:
            damaged[i] = str(e)
            dst[...] = 0

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for a in range(0, n, CHUNK):
            b = min(a + CHUNK, n)
            chunk = (out[a:b] if host else staging[:b - a]).numpy()
            list(pool.map(lambda i: fill(chunk[i - a], i), range(a, b)))
            if not host:
                out[a:b].copy_(staging[:b - a], non_blocking=False)
    return damaged


class MemoryPatchPipeline(PatchPipeline):
    """The plan's patches cut from the whole dataset held in memory (one gather per step)."""
    backend = "memory"
    follows_plan = False

    def __init__(self, cfg, schedule, rank, world_size, device, source, where: str):
        super().__init__(cfg, schedule, rank, world_size, device, source)
        store = self.device if where == "device" else torch.device("cpu")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        need = check_fits(source, where, self.device, local)
        t = time.perf_counter()
        shape = (source.count, source.resolution, source.resolution, source.channels)
        dtype = torch.from_numpy(np.empty(0, source.dtype)).dtype
        self.pin = pin = store.type == "cpu" and self.device.type == "cuda"   # async copies of the gathered patches
        self.data = torch.empty(shape, dtype=dtype, device=store, pin_memory=pin)
        # Damaged samples are met as the streaming loaders meet them: when a step draws one, data.on_corrupt
        # stops the run or the next good sample takes its place (PatchPipeline applies it).
        self.damaged = load_samples(source, self.data, int(cfg.data.workers))
        self._damaged_ids = np.fromiter(self.damaged, np.int64, len(self.damaged))
        if rank == 0:
            bad = (f"; {len(self.damaged)} damaged "
                   f"(data.on_corrupt={cfg.data.on_corrupt} applies when a step draws one)"
                   if self.damaged else "")
            print(f"pdiff: data.cache={where}: {source.count:,} samples ({_gb(need)}) decoded into "
                  f"{'pinned ' if pin else ''}{store} memory in {time.perf_counter() - t:.1f} s{bad}", file=sys.stderr,
                  flush=True)
        self._steps = None

    def _start(self, images_seen: int) -> None:
        self._steps = self.plan.steps(images_seen)

    def _next_step(self):
        step = next(self._steps)
        indices, replaced = step.indices, []
        if self.damaged:                     # the next good sample, as read_checked picks it when streaming
            indices = indices.copy()
            for row in np.flatnonzero(np.isin(indices, self._damaged_ids)):
                indices[row] = read_checked(self.source, int(indices[row]), int(row), lambda j: j, replaced,
                                            self.damaged)
        return step, self.crop(indices, step.read_xy, step.patch_size), replaced

    def _stop(self) -> None:
        self._steps = None

    def crop(self, indices: np.ndarray, read_xy: np.ndarray, s: int) -> torch.Tensor:
        """Samples ``indices`` cropped at ``read_xy`` (x0, y0): one gather of (b, s, s, C) elements
        where the data lives; images stay uint8 HWC, latents become float32 CHW (as the loaders give) on
        the training device (from pinned memory: the stored type crosses, then permuted and cast there)."""
        data = self.data
        dev = data.device
        idx = torch.from_numpy(indices).to(dev)
        xy = torch.from_numpy(read_xy).to(dev)
        offs = torch.arange(s, device=dev)
        r = data.shape[1]
        rows = (idx[:, None] * r + xy[:, 1, None] + offs) * r                  # (b, s): first pixel of each row
        pixels = (rows[:, :, None] + xy[:, 0, None, None] + offs).reshape(-1)    # (b s s,) pixel numbers
        flat = data.view(-1, data.shape[3])
        if self.pin:                                                 # into pinned memory: the copy to the GPU is async
            out = torch.empty((pixels.numel(), data.shape[3]), dtype=data.dtype, pin_memory=True)
            torch.index_select(flat, 0, pixels, out=out)
        else:
            out = flat.index_select(0, pixels)
        patches = out.view(len(indices), s, s, data.shape[3])
        if self.patch_dtype != torch.uint8:     # latents: values as stored, float32 CHW, made where the step runs
            patches = patches.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).contiguous()
        return patches
