"""The DALI backend. An ``external_source`` supplies, per iteration, the encoded bytes of the step's
samples (read by index from the sample source), the crop anchors (y0, x0) and the crop shape (s, s);
DALI decodes and slices, and hands over uint8 HWC patches on the device that receives them (the
training step's kernels normalize). The callback is a pure function of the iteration number
(iteration k of a pipeline started at images seen n is the k-th step after n), so DALI may run it
ahead of time.

Decoding only what is cropped (pipelines/regions.py): the encoded samples go through DALI's ROI
decoder (fn.decoders.image_slice), which decodes and slices in one: for JPEG it stops after the
patch's last MCU row and skips the inverse DCT of the columns outside it; JPEG with the "mixed"
decoder (nvJPEG on the GPU) where the target device is CUDA, PNG and WebP on DALI's CPU threads
(nvImageCodec decodes them on the CPU anyway, whole), then the patches, not the images, go to the
GPU. Raw samples are not decoded: the callback reads only the patch's rows from the source and feeds
the patches as one typed batch. CPU-only (device_id=None) elsewhere.

Latents are fed like raw, as one typed (b, s, s, C) float16/float32 batch of patches; they are moved
to the GPU where the patches go there, transposed to CHW and cast to float32 without normalization.

Damaged samples: the callback reads each sample through its checksum (pipelines/corrupt.py), so a
damaged one is replaced (and reported with the step) before DALI sees a byte of it; a decoder fed
damaged bytes may crash the process. (A raw or latent patch read by its rows has exactly those rows and
its label member checked, shard format version 4; see ShardSet.read_region.) Shards without checksums can
still hand DALI bytes it
cannot decode: its error names no sample and leaves the pipeline unusable, so the samples fed are
decoded again on the host to find the culprit, which is then treated as damaged, and the pipeline is
rebuilt at the same step.
"""
from __future__ import annotations

import re
import threading

import numpy as np
import torch

from pdiff.pipelines.base import PatchPipeline
from pdiff.pipelines.corrupt import Replaced, read_checked
from pdiff.pipelines.sample_source import UNIFORM_ENCODINGS, CorruptSample, SourceError
from pdiff.pipelines.shards.format import ShardError
from pdiff.pipelines.torch_loader import read_patches


class DaliPatchPipeline(PatchPipeline):
    backend = "dali"

    def __init__(self, cfg, schedule, rank, world_size, device, source):
        super().__init__(cfg, schedule, rank, world_size, device, source)
        self.cuda = self.device.type == "cuda"
        self._pipe = None
        self._lock = threading.Lock()
        self._planned: dict[int, object] = {}
        self._steps = None
        self._consumed = 0
        self._replaced: dict[int, list[Replaced]] = {}     # iteration fed -> rows read from another sample
        self._undecodable: dict[int, str] = {}             # sample -> why: DALI failed on it

    # The callback runs ahead of the consumer (prefetch): keep the planned steps until consumed.
    def _step_for(self, iteration: int):
        with self._lock:
            while iteration not in self._planned:
                self._planned[self._generated] = next(self._steps)
                self._generated += 1
            return self._planned[iteration]

    def _record(self, iteration: int, replaced: list[Replaced]) -> None:
        """Iteration ``iteration`` was fed, with these rows read from another sample than planned."""
        with self._lock:
            self._replaced[iteration] = replaced

    def _feed_patches(self, info):
        """Raw and latent: the step's patches themselves, read by the source (only their rows), as one
        typed (b, s, s, C) batch."""
        step = self._step_for(info.iteration)
        data, replaced = read_patches(self.source, step.indices, step.read_xy, step.patch_size,
                                      known=self._undecodable)
        self._record(info.iteration, replaced)
        return data

    def _feed_encoded(self, info):
        """The step's encoded samples (each through its checksum), their crop anchors (y0, x0) and the
        crop shape (s, s). The bytes go as stored: DALI's decoders (libpng, libjpeg-turbo) print a
        warning for every image whose header was cut to fewer rows (pipelines/regions.py), and its ROI
        decoder already stops a JPEG after the patch's rows."""
        step = self._step_for(info.iteration)
        replaced: list[Replaced] = []
        data = [np.frombuffer(read_checked(self.source, int(i), j, self.source.read, replaced, known=self._undecodable),
                              np.uint8)
                for j, i in enumerate(step.indices)]
        self._record(info.iteration, replaced)
        anchors = np.ascontiguousarray(step.read_xy[:, ::-1], dtype=np.int32)     # (y0, x0) for axes (H, W)
        return data, anchors, np.full((len(data), 2), step.patch_size, np.int32)

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        enc = self.source.encoding
        cuda = self.cuda
        uniform = enc in UNIFORM_ENCODINGS
        data_type = {np.dtype(np.uint8): types.UINT8, np.dtype("<f2"): types.FLOAT16,
                     np.dtype("<f4"): types.FLOAT}[np.dtype(self.source.dtype)]

        @pipeline_def
        def graph():
            if uniform:                 # already cut by the callback
                patches = fn.external_source(source=self._feed_patches, batch=True, batch_info=True,
                                             dtype=data_type, layout="HWC")
            else:                       # decode + slice in one: the ROI decoder (integer anchors are absolute)
                data, anchors, shapes = fn.external_source(source=self._feed_encoded, num_outputs=3, batch=True,
                                                           batch_info=True, dtype=[types.UINT8, types.INT32,
                                                                                   types.INT32])
                kind = types.GRAY if self.source.channels == 1 else types.RGB
                patches = fn.decoders.image_slice(data, anchors, shapes, axes=[0, 1], output_type=kind,
                                                  device="mixed" if cuda and enc == "jpeg" else "cpu")
            if cuda and patches.device == "cpu":
                patches = patches.gpu()
            if enc == "latent":          # values as stored
                return fn.cast(fn.transpose(patches, perm=[2, 0, 1], output_layout="CHW"), dtype=types.FLOAT)
            return patches               # uint8 HWC

        device_id = ((self.device.index if self.device.index is not None else torch.cuda.current_device())
                     if cuda else None)
        pipe = graph(batch_size=self.plan.max_per_rank, num_threads=max(1, int(self.cfg.data.workers)),
                     device_id=device_id, seed=self.seed & 0x7FFFFFFF,
                     prefetch_queue_depth=max(1, int(self.cfg.data.prefetch)))
        pipe.build()
        return pipe

    def _start(self, images_seen: int) -> None:
        self._steps = self.plan.steps(images_seen)
        self._planned, self._generated, self._consumed = {}, 0, 0
        self._pipe = self._build()

    def _next_step(self):
        try:
            (out,) = self._pipe.run()
        except RuntimeError as e:
            if isinstance(e, SourceError):      # raised by the feeding callback, already clear
                raise
            self._find_undecodable(e)
            self._stop()
            self._start(self.images_seen)       # the same step again, the culprit replaced this time
            return self._next_step()
        step = self._step_for(self._consumed)
        with self._lock:
            del self._planned[self._consumed]
            replaced = self._replaced.pop(self._consumed, [])
        self._consumed += 1
        tensor = out.as_tensor()
        if self.cuda:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dst = torch.empty(tuple(tensor.shape()), dtype=self.patch_dtype, device=self.device)
            feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream(self.device))
            return step, dst, replaced
        return step, torch.from_numpy(np.array(tensor)), replaced

    def _find_undecodable(self, error: Exception) -> None:
        """After DALI failed: the samples fed and not yet delivered that the host cannot decode either
        (or the one DALI's message numbers) join ``_undecodable``; none is an error saying so."""
        fed = []                         # per iteration fed and not delivered: the samples fed, replacements applied
        with self._lock:
            for k in sorted(self._replaced):
                if k >= self._consumed:
                    indices = self._planned[k].indices.copy()
                    for r in self._replaced[k]:
                        indices[r.row] = r.used
                    fed.append(indices)
        found = False
        for indices in fed:
            for i in map(int, indices):
                if i in self._undecodable:
                    continue
                try:
                    self.source.decode(i)
                except CorruptSample as e:
                    self._undecodable[i] = f"{e} (DALI's decoder failed on it too)"
                    found = True
            if found:
                return
        lines = [line.strip() for line in str(error).splitlines()
                 if line.strip() and "no longer valid" not in line and "Critical error" not in line]
        gist = lines[-1] if lines else type(error).__name__
        number = re.search(r"sample #(\d+)", str(error))
        if fed and number and int(number.group(1)) < len(fed[0]):
            i = int(fed[0][int(number.group(1))])
            if i not in self._undecodable:
                self._undecodable[i] = f"{self.source.describe(i)}: DALI cannot decode it ({gist})"
                return
        raise ShardError(f"DALI failed on the step at {self.images_seen:,} images ({gist}), but each of its samples "
                         f"decodes on the host (Pillow), so the culprit is unknown; run `pdiff shard verify "
                         f"{self.cfg.data.path}`, or train with data.backend=torch, which decodes with Pillow")

    def _stop(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            del pipe
        self._planned, self._steps = {}, None
        self._replaced = {}
