"""Patch batches for training: one patch size per step, B * R/s patches, each from its own image.

    pipe = build_pipeline(cfg, schedule, rank, world_size, device)
    batch = next(pipe)   # .patches uint8 (b, s, s, C), .offsets (b, 2) = (x0, y0), .labels, ...

Image patches are uint8 HWC, as decoded, on the target device: a quarter of float32's bytes cross to
the GPU, and the training step's kernels map v to (v - 127.5) / 127.5 as they read
(``Batch.float_patches()`` gives that float32 CHW tensor, for code that wants one).

Latent shards (encoding "latent": float16/float32 H x W x C samples, any C) give float32 patches with
the values as stored (no [-1, 1] normalization; the user's scale, e.g. 0.18215, is already in them),
through the same plan, state and guards. Posterior latents (`pdiff shard --encode-vae`: mean | std of
the autoencoder's posterior) are read and cropped the same way, and then each patch becomes a fresh
draw (mean + std * eps - shift) * scale, eps from (seed, images seen) like the crops (base.py). DALI
reads latents like raw: the bytes are fed as a typed HWC batch, sliced, transposed to CHW and cast to
float32; the torch backend does the same in numpy.

Design. Everything random is decided on the host as a pure function before any pixel is read
(pipelines/order.py): the step's patch size (the schedule, from images seen), which samples (an epoch
permutation split across ranks), and the crop positions (drawn for the global step from seed and
images seen; rank r keeps rows r, r+W, ... of both, so W ranks read what one process would). The
backends only fetch, decode and crop what the plan names, from a sample source (pipelines/
sample_source.py: count, labels, fingerprint, read(i); the shard folders of `pdiff shard` are the
registered one, pipelines/sources.py). A damaged sample (checksum or decode) stops the run naming it,
or with ``data.on_corrupt=skip`` is replaced by the next good one (pipelines/corrupt.py):

* dali: an ``external_source`` feeds each iteration the encoded bytes of the step's samples, the crop
  anchors and the crop shape; DALI decodes (JPEG on the GPU with the "mixed" decoder where CUDA
  exists, PNG/WebP on its CPU threads, raw not at all) and slices (on the GPU when the patches go
  there).
  Batches vary in size per iteration (b = batch_for(s) / W), which DALI accepts when no reader sets a
  fixed batch size. We do not use ``fn.readers.webdataset``: a reader returns the pipeline's fixed
  ``batch_size`` every iteration (one patch size per step changes it), its shuffling draws from a
  buffer of ``initial_fill`` samples (an order that is not a permutation a test can recompute from the
  seed and epoch), and ``fn.random.uniform`` draws crop positions from [min, max) and rounds the draw
  when the output type is an integer (so the two end positions come up half as often as the others).
* memory (``data.cache = host | device``, pipelines/memory.py): the whole dataset decoded once into
  host or device memory (images as uint8, latents and posteriors in their stored float type); each
  step is one gather of the plan's crops, and posteriors are drawn from as the streaming backends do.
* torch: a DataLoader whose workers read samples by index (for shards: with the indexes; not the
  webdataset library, whose streaming shuffle is not a function of the epoch), decode with Pillow
  and crop; the sampler hands out the plan's steps in chunks, so the order does not depend on the
  number of workers. Needs only torch, numpy and Pillow.

Because nothing random lives inside the loaders, the resumable state is the number of images seen
(plus guards: world size, batch, resolution, seed, dataset); DALI's own checkpointing is not needed,
and both backends give the same samples and crops (bit-identical patches for PNG and raw).

This __init__ imports no torch: the shard writer (pipelines/shards) and its worker processes use the
package without it, and build_pipeline imports the backend it builds (torch; DALI for dali_loader.py).
"""
from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

from pdiff.pipelines.batch import Batch, PipelineStateError
from pdiff.pipelines.sample_source import SampleSource, SourceError
from pdiff.pipelines.shards.format import ShardError
from pdiff.pipelines.sources import SOURCES, open_source, register_source

if TYPE_CHECKING:   # annotations only: the shard writer uses this package without torch
    import torch

    from pdiff.pipelines.base import PatchPipeline

__all__ = ["build_pipeline", "open_data", "PipelineStateError", "Batch", "PatchPipeline", "SampleSource", "SOURCES",
           "ShardError",
           "SourceError", "dali_available", "open_source", "register_source"]


_DALI: list[bool] = []


def dali_available() -> bool:
    """DALI can be imported here (tried once; a broken install counts as missing)."""
    if not _DALI:
        ok = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
        if ok:
            try:
                import nvidia.dali  # noqa: F401
            except (ImportError, OSError):
                ok = False
        _DALI.append(ok)
    return _DALI[0]


def open_data(data) -> SampleSource:
    """The samples at ``data.path`` (the config's data section), through the source registry."""
    if not data.path:
        raise SourceError("data.path is empty: set it to a folder written by `pdiff shard` (in the config "
                          "file, or data.path=FOLDER on the command line)")
    return open_source(data.path, verify_checksums=bool(getattr(data, "verify_checksums", False)),
                       cache_dir=getattr(data, "cache_dir", ""), cache_limit_gb=getattr(data, "cache_limit_gb", 0.0))


def build_pipeline(cfg, schedule, rank: int = 0, world_size: int = 1,
                   device: torch.device | str = "cpu", source: SampleSource | None = None) -> PatchPipeline:
    """The patch pipeline over the samples at ``cfg.data.path`` (opened through the source registry,
    pipelines/sources.py; shards are checked against their manifest first), or over ``source``
    when it is already open (``pdiff.dataset.open_dataset``)."""
    import torch      # here, not at the top: the shard writer uses this package without torch
    data = cfg.data
    source = open_data(data) if source is None else source
    if not source.checksummed and rank == 0:
        print(f"pdiff: WARNING {data.path}: the samples carry no checksums, so a damaged one is caught only if it "
              f"fails to decode (and may crash DALI's decoder); shards written by `pdiff shard` before format "
              f"version 3 are like this: re-create them to have every sample checked", file=sys.stderr)
    if source.resolution != data.resolution or source.resolution != schedule.resolution:
        raise SourceError(f"{data.path}: samples are {source.resolution}x{source.resolution} but data.resolution is "
                          f"{data.resolution} (schedule: {schedule.resolution}); set "
                          f"data.resolution={source.resolution}")
    if source.sample_channels != data.channels:
        what = (f"posterior latents of {source.sample_channels} channel(s) (mean | std stored)"
                if source.sample_channels != source.channels else f"samples have {source.channels} channel(s)")
        raise SourceError(f"{data.path}: {what} but data.channels is {data.channels}; "
                          f"set data.channels={source.sample_channels}")
    if data.cache != "none":             # the in-memory mode decodes with the source itself, whatever the backend
        from pdiff.pipelines.memory import MemoryPatchPipeline      # the backends import torch (below too)
        return MemoryPatchPipeline(cfg, schedule, rank, world_size, torch.device(device), source, data.cache)
    backend = data.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    if backend == "dali":
        if not dali_available():
            raise ImportError("data.backend=dali but NVIDIA DALI is not installed (pip install 'pdiff[dali-cuda12]' "
                              "or 'pdiff[dali-cuda13]' for your CUDA version, or set data.backend=torch)")
        from pdiff.pipelines.dali_loader import DaliPatchPipeline   # and DALI
        return DaliPatchPipeline(cfg, schedule, rank, world_size, torch.device(device), source)
    if backend == "torch":
        from pdiff.pipelines.torch_loader import TorchPatchPipeline   # torch
        return TorchPatchPipeline(cfg, schedule, rank, world_size, torch.device(device), source)
    raise ValueError(f"data.backend must be auto, dali or torch, got {backend!r}")


def __getattr__(name):
    if name == "PatchPipeline":
        from pdiff.pipelines.base import PatchPipeline   # torch: the shard writer uses this package without it
        return PatchPipeline
    raise AttributeError(name)
