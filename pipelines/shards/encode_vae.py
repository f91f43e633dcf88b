"""`pdiff shard --encode-vae`: the stage between the preprocessing workers and the shard writer that
turns images into an autoencoder's posterior. The workers decode and transform each image to R x R x 3
as for pixel shards (a bad image is a bad input there, reported the same way) and hand over its raw
pixels; here they are encoded in batches on the VAE's device (the GPU where there is one), and each
sample leaves as the posterior's mean | std, (R/f) x (R/f) x 2C in the stored dtype. Input order, and
so shard contents and resume, are those of pixel shards.

``EncodedImages`` reads the images a posterior folder was made from, as the encoder saw them (for
FID reference statistics, which come from images, not latents).

Only this stage needs torch (and diffusers, through pdiff.vae); it is imported with --encode-vae only.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from pdiff.pipelines.shards.inputs import ShardInputError, open_inputs
from pdiff.pipelines.shards.options import Options, write_order
from pdiff.pipelines.shards.preprocess import BadInput, _prepare, _prepare_latent, image_batches

Result = tuple[int, "bytes | None", "str | None"]        # (input position, sample bytes, bad-input reason)


class PosteriorEncoder:
    """Raw images -> posterior bytes, ``batch`` images per encoder pass."""

    def __init__(self, vae, image_resolution: int, dtype: str, batch: int = 32):
        self.vae, self.resolution, self.batch = vae, image_resolution, max(1, int(batch))
        self.store = {"layout": "nhwc", "dtype": dtype}

    def stream(self, results: Iterable[list[Result]]) -> Iterator[list[Result]]:
        """The workers' chunks of results, re-cut into batches of ``batch`` images (bad inputs pass
        through in their place), each image's bytes replaced by its posterior's."""
        for pending in image_batches(results, self.batch):
            yield self.encode(pending)

    def encode(self, results: list[Result]) -> list[Result]:
        rows = [k for k, (_, data, _) in enumerate(results) if data is not None]
        if not rows:
            return results
        r = self.resolution
        pixels = np.stack([np.frombuffer(results[k][1], np.uint8).reshape(r, r, -1) for k in rows])
        mean, std = self.vae.encode(pixels)
        posterior = torch.cat([mean, std], 1).permute(0, 2, 3, 1).cpu().numpy()   # HWC: mean | std channels
        out = list(results)
        for k, sample in zip(rows, posterior):
            try:
                out[k] = (results[k][0], _prepare_latent(sample, self.store), None)
            except BadInput as e:          # NaN/inf from the encoder, or past float16's range
                out[k] = (results[k][0], None, f"{e.reason}: {e.detail} (from the VAE encoder)")
        return out


class EncodedImages:
    """The images behind a posterior folder's samples, in sample order: its manifest's source through
    its transform, in the writer's seeded order (its ``shuffle_seed``), less the inputs the writer
    skipped (the manifest lists them)."""

    def __init__(self, manifest: dict):
        given = manifest["source"]          # as typed when the shards were written; the fingerprint holds it resolved
        self.root, self.count = manifest.get("fingerprint", {}).get("source") or given, int(manifest["count"])
        self.resolution, channels = int(manifest["image_resolution"]), int(manifest.get("image_channels", 3))
        self.transform = manifest["transform"]
        opts = Options(resolution=self.resolution, transform=self.transform, channels=channels)
        try:
            self.inputs = open_inputs(self.root, opts)
        except ShardInputError as e:
            raise ShardInputError(f"the images it was encoded from are not readable at {self.root} ({e})") from None
        listed = manifest.get("fingerprint", {}).get("n_items", len(self.inputs.items))
        if len(self.inputs.items) != listed:         # the write order is a permutation of that many
            raise ShardInputError(f"{self.root} now lists {len(self.inputs.items)} images, {listed} when the shards "
                                  f"were written: the source changed since it was encoded")
        self.inputs.reorder(write_order(listed, manifest.get("shuffle_seed")))
        # an input's report path is the source's path + its place in it: compare the places
        skipped = {s["path"][len(given):] for s in manifest["skipped"]["items"] if s["path"].startswith(given)}
        self.items = [it for it in self.inputs.items if it.path[len(self.root):] not in skipped]
        if len(self.items) != self.count:
            raise ShardInputError(f"{self.root} now holds {len(self.items)} usable images, the shards {self.count}: "
                                  f"the source changed since it was encoded")
        self.channels = channels

    def image(self, k: int) -> np.ndarray:
        item = self.items[k]
        try:
            return _prepare(self.inputs.load(item.ref), item.path, self.resolution, self.channels, self.transform)
        except (BadInput, OSError) as e:
            raise ShardInputError(f"{item.path}: was encoded, now cannot be read ({e})") from None

    def batches(self, n: int, count: int | None = None) -> Iterator[np.ndarray]:
        """(n, R, R, C) uint8 batches of the first ``count`` images."""
        count = self.count if count is None else count
        for i in range(0, count, n):
            yield np.stack([self.image(k) for k in range(i, min(i + n, count))])
