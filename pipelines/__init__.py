"""Patch batches for training: one patch size per step, B * R/s patches, each from its own image.

    pipe = build_pipeline(cfg, schedule, rank, world_size, device)
    batch = next(pipe)   # .patches (b, C, s, s) in [-1, 1], .offsets (b, 2) = (x0, y0), .labels, ...

Latent shards (encoding "latent": float16/float32 H x W x C samples, any C) give float32 patches with
the values as stored (no [-1, 1] normalization; the user's scale, e.g. 0.18215, is already in them),
through the same plan, state and guards. DALI reads them like raw: the bytes are fed as a typed HWC
batch, sliced, transposed to CHW and cast to float32; the torch backend does the same in numpy.

Design. Everything random is decided on the host as a pure function before any pixel is read
(pipelines/order.py): the step's patch size (the schedule, from images seen), which samples (an epoch
permutation split across ranks), and the crop positions (drawn for the global step from seed and
images seen; rank r keeps rows r, r+W, ... of both, so W ranks read what one process would). The
backends only fetch, decode and crop what the plan names:

* dali: an ``external_source`` feeds each iteration the encoded bytes of the step's samples (read
  with the shard indexes), the crop anchors and the crop shape; DALI decodes (JPEG on the GPU with
  the "mixed" decoder where CUDA exists, PNG/WebP on its CPU threads, raw not at all), slices and
  normalizes to float32 CHW (on the GPU when the patches go there).
  Batches vary in size per iteration (b = batch_for(s) / W), which DALI accepts when no reader sets a
  fixed batch size. We do not use ``fn.readers.webdataset``: its fixed batch size, its local shuffle
  buffer and ``fn.random.uniform``'s rounding of integer positions (DALI-NOTES) would rule out both
  one-size-per-step batches and an order that tests can recompute.
* torch: a DataLoader whose workers read samples by index from the tars (with the same indexes; not
  the webdataset library, whose streaming shuffle is not a function of the epoch), decode with Pillow
  and crop; the sampler hands out the plan's steps in chunks, so the order does not depend on the
  number of workers. Needs only torch, numpy and Pillow.

Because nothing random lives inside the loaders, the resumable state is the number of images seen
(plus guards: world size, batch, resolution, seed, dataset); DALI's own checkpointing is not needed,
and both backends give the same samples and crops (bit-identical patches for PNG and raw).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from pdiff.pipelines.shards import ShardError, ShardSet

__all__ = ["build_pipeline", "PipelineStateError", "Batch", "PatchPipeline", "ShardError", "dali_available"]


class PipelineStateError(RuntimeError):
    """A saved pipeline state that does not fit the pipeline it is loaded into."""


@dataclass
class Batch:
    patches: torch.Tensor     # float32 (b, C, s, s) in [-1, 1] (latents: the stored values)
    offsets: torch.Tensor     # int64 (b, 2) = (x0, y0)
    labels: torch.Tensor      # int64 (b,), -1 where the dataset has no labels
    patch_size: int
    images_seen: int          # global images seen before this step


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


def build_pipeline(cfg, schedule, rank: int = 0, world_size: int = 1,
                   device: torch.device | str = "cpu") -> PatchPipeline:
    """The patch pipeline over the shards in ``cfg.data.path`` (checked against their manifest first)."""
    import torch
    data = cfg.data
    if not data.path:
        raise ShardError("data.path is empty: point it at a folder written by `pdiff shard`")
    shards = ShardSet(data.path, checksums=bool(getattr(data, "verify_checksums", False)))
    m = shards.manifest
    if m["resolution"] != data.resolution or m["resolution"] != schedule.resolution:
        raise ShardError(f"{data.path}: shards are {m['resolution']}x{m['resolution']} but data.resolution is "
                         f"{data.resolution} (schedule: {schedule.resolution}); set data.resolution={m['resolution']}")
    if m["channels"] != data.channels:
        raise ShardError(f"{data.path}: shards have {m['channels']} channel(s) but data.channels is {data.channels}; "
                         f"set data.channels={m['channels']}")
    backend = data.backend
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    if backend == "dali":
        if not dali_available():
            raise ImportError("data.backend=dali but NVIDIA DALI is not installed (pip install "
                              "nvidia-dali-cuda130, or set data.backend=torch)")
        from pdiff.pipelines.dali_loader import DaliPatchPipeline
        return DaliPatchPipeline(cfg, schedule, rank, world_size, torch.device(device), shards)
    if backend == "torch":
        from pdiff.pipelines.torch_loader import TorchPatchPipeline
        return TorchPatchPipeline(cfg, schedule, rank, world_size, torch.device(device), shards)
    raise ValueError(f"data.backend must be auto, dali or torch, got {backend!r}")


def __getattr__(name):
    if name == "PatchPipeline":     # imported lazily: the shard writer uses this package without torch
        from pdiff.pipelines.base import PatchPipeline
        return PatchPipeline
    raise AttributeError(name)
