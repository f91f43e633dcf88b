"""The DALI backend. An ``external_source`` supplies, per iteration, the encoded bytes of the step's
samples (read by index from the sample source), the crop anchors (y0, x0) and the crop shape (s, s); DALI
decodes, slices and normalizes to
float32 CHW in [-1, 1] (on the device that receives the patches). The callback is a pure function of the iteration number (iteration k of a
pipeline started at images seen n is the k-th step after n), so DALI may run it ahead of time.

Decoding: JPEG with the "mixed" decoder (nvJPEG on the GPU) where the target device is CUDA; PNG and
WebP on DALI's CPU threads (nvImageCodec decodes them on the CPU anyway), then the patches, not the
images, go to the GPU; raw is sliced without a decode. CPU-only (device_id=None) elsewhere.

Latents are fed like raw, as one typed (b, R, R, C) float16/float32 batch; they are sliced, moved to
the GPU where the patches go there, transposed to CHW and cast to float32 without normalization.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from pdiff.pipelines.base import PatchPipeline
from pdiff.pipelines.sample_source import UNIFORM_ENCODINGS


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

    # The callback runs ahead of the consumer (prefetch): keep the planned steps until consumed.
    def _step_for(self, iteration: int):
        with self._lock:
            while iteration not in self._planned:
                self._planned[self._generated] = next(self._steps)
                self._generated += 1
            return self._planned[iteration]

    def _feed(self, info):
        step = self._step_for(info.iteration)
        src = self.source
        n = len(step.indices)
        if src.encoding in UNIFORM_ENCODINGS:      # one uniform array: DALI takes it as a batch, no per-sample cost
            data = np.empty((n, src.resolution, src.resolution, src.channels), src.dtype)
            for j, i in enumerate(step.indices):
                src.read_into(int(i), data[j])
        else:
            data = [np.frombuffer(src.read(int(i)), np.uint8) for i in step.indices]
        anchors = np.ascontiguousarray(step.read_xy[:, ::-1], dtype=np.int32)     # (y0, x0) for axes (H, W)
        shapes = np.full((n, 2), step.patch_size, np.int32)
        return data, anchors, shapes

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        enc = self.source.encoding
        cuda = self.cuda
        uniform = enc in UNIFORM_ENCODINGS
        data_type = {np.dtype(np.uint8): types.UINT8, np.dtype("<f2"): types.FLOAT16,
                     np.dtype("<f4"): types.FLOAT}[np.dtype(self.source.dtype)]

        @pipeline_def
        def graph():
            data, anchors, shapes = fn.external_source(source=self._feed, num_outputs=3, batch=True, batch_info=True,
                                                       dtype=[data_type, types.INT32, types.INT32],
                                                       layout=["HWC" if uniform else None, None, None])
            if uniform:
                images = data
            else:
                kind = types.GRAY if self.source.channels == 1 else types.RGB
                images = fn.decoders.image(data, device="mixed" if cuda and enc == "jpeg" else "cpu", output_type=kind)
            patches = fn.slice(images, anchors, shapes, axes=[0, 1])
            if cuda and patches.device == "cpu":
                patches = patches.gpu()
            if enc == "latent":          # values as stored
                return fn.cast(fn.transpose(patches, perm=[2, 0, 1], output_layout="CHW"), dtype=types.FLOAT)
            c = self.source.channels
            return fn.crop_mirror_normalize(patches, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[127.5] * c, std=[127.5] * c)

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
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
        (out,) = self._pipe.run()
        step = self._step_for(self._consumed)
        with self._lock:
            del self._planned[self._consumed]
        self._consumed += 1
        tensor = out.as_tensor()
        if self.cuda:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dst = torch.empty(tuple(tensor.shape()), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream(self.device))
            return step, dst
        return step, torch.from_numpy(np.array(tensor))

    def _stop(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            del pipe
        self._planned, self._steps = {}, None
