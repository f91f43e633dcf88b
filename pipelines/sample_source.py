"""The sample-source protocol: all the patch pipelines (both backends and the plan in order.py) need
from a dataset, so that a new source (another container format, a streaming store) plugs in without
touching the loaders. Sources are registered in pipelines/sources.py.

A sample is an R x R x C image or latent, stored in one of ``ENCODINGS``:

* ``png``, ``jpeg``, ``webp``: an encoded image file (uint8 after decoding, 1 or 3 channels). The DALI
  backend is fed these bytes and decodes them itself (JPEG on the GPU).
* ``raw``: the R x R x C uint8 bytes, row-major (HWC);
* ``latent``: the R x R x C little-endian float16 or float32 bytes (HWC), values as stored. A latent
  source says what its values are in ``latent`` (a `LatentSpace`): latents as the network sees them,
  or (``posterior``) the mean and std of an autoencoder's posterior, C/2 channels each, from which
  the pipeline draws a fresh latent every time a sample is read.

Raw and latent samples have a fixed size (``UNIFORM_ENCODINGS``): the DALI backend gets them as one
typed batch with ``read_into`` and neither backend decodes them.

This module imports numpy only (Pillow when a PNG/JPEG/WebP is decoded), so the shard writer's worker
processes stay light.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pdiff.errors import UserError
from pdiff.pipelines.regions import top_rows

ENCODINGS = ("png", "jpeg", "webp", "raw", "latent")
UNIFORM_ENCODINGS = ("raw", "latent")
LATENT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


@dataclass(frozen=True)
class LatentSpace:
    """What the values of a latent source are. The network sees latent = (z - shift) * scale, with z
    in the autoencoder's own space (diffusers' convention; the SD VAE: scale 0.18215, shift 0).

    * ``posterior`` False: the samples are such latents already (scale and shift say what was applied).
    * ``posterior`` True: the samples are z's posterior N(mean, std^2), stored as mean | std (channels
      0..C/2-1 and C/2..C-1, as EDM2 stores them); the pipeline draws z = mean + std * eps per sample
      and step, then applies scale and shift (pipelines/base.py).
    """
    scale: float = 1.0
    shift: float = 0.0
    posterior: bool = False
    vae: dict | None = None          # the autoencoder's record (pdiff.vae.VAE.record) when pdiff encoded them


class SourceError(UserError, RuntimeError):
    """A dataset that cannot be read, or does not match what the config says about it."""


class CorruptSample(SourceError):
    """One sample whose stored bytes fail their checksum, or cannot be read or decoded; the message
    names where it lives. The pipelines apply ``data.on_corrupt`` to it (pipelines/corrupt.py)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index

    def __reduce__(self):
        return type(self), (self.index, str(self))


def decode_sample(data: bytes | memoryview, encoding: str, resolution: int, channels: int,
                  dtype: np.dtype | str | None = None, rows: int | None = None) -> np.ndarray:
    """Bytes of one stored image -> (R, R, C) uint8; of one latent -> (R, R, C) in its ``dtype``.
    ``rows``: the bytes may describe only the image's top rows, at least that many (see
    pipelines/regions.py); the array then has those rows only."""
    if encoding in UNIFORM_ENCODINGS:
        dt = np.dtype(dtype or ("<f2" if encoding == "latent" else np.uint8))
        want = resolution * resolution * channels * dt.itemsize
        if len(data) != want:
            raise SourceError(f"{encoding} sample has {len(data)} bytes, expected {want} "
                              f"({resolution}x{resolution}x{channels} {dt.name})")
        return np.frombuffer(data, dt).reshape(resolution, resolution, channels)
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        want_mode = "L" if channels == 1 else "RGB"
        if im.mode != want_mode:
            im = im.convert(want_mode)
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (resolution, resolution, channels) and not (
            rows and rows <= arr.shape[0] <= resolution and arr.shape[1:] == (resolution, channels)):
        raise SourceError(f"decoded image has shape {arr.shape}, expected {(resolution, resolution, channels)}")
    return arr


class SampleSource:
    """Random access to a dataset's samples by index 0..count-1, and the facts the pipeline checks
    against the config.

    A source sets the facts (in ``__init__``) and implements ``labels``, ``fingerprint`` and
    ``read``; ``decode`` and ``read_into`` follow from ``read`` (override them where the container
    offers something faster). It must survive pickling into DataLoader worker processes (open files
    lazily, per process).
    """
    count: int                       # samples
    resolution: int                  # R: every sample is R x R
    channels: int                    # C
    encoding: str                    # one of ENCODINGS: what read(i) returns
    dtype: np.dtype = np.dtype(np.uint8)    # of a decoded sample: uint8, or the latents' float16/float32
    num_classes: int = 0             # 0 when the dataset has no labels
    checksummed: bool = False        # read() checks a per-sample checksum (damage is caught before decoding)
    latent: LatentSpace | None = None   # latent sources: what the values are (None for images)
    features: dict | None = None        # stored feature grids (`pdiff shard --encode-features`): grid, channels, ...

    @property
    def sample_channels(self) -> int:
        """Channels of a sample as the pipeline delivers it: C/2 for a posterior's mean | std."""
        return self.channels // 2 if self.latent is not None and self.latent.posterior else self.channels

    @property
    def labels(self) -> np.ndarray:
        """(count,) int64 class labels, -1 where the dataset has none."""
        raise NotImplementedError

    @property
    def plan_labels(self):
        """What the plan (pipelines/order.py) indexes labels with, by a step's sample indices: ``labels``
        itself here; a source too large to read every label at opening returns an object indexed like it
        that reads them as asked (ShardSet of format version 4)."""
        return self.labels

    def fingerprint(self) -> str:
        """A short string that changes when the data changes (guards a saved pipeline state)."""
        raise NotImplementedError

    def read(self, i: int) -> bytes:
        """The stored bytes of sample ``i``, in ``encoding``. A source that keeps checksums checks them
        here and raises `CorruptSample` for a damaged sample, so no decoder ever sees its bytes."""
        raise NotImplementedError

    def read_features(self, i: int) -> np.ndarray:
        """Sample ``i``'s stored feature grid (C_f, g, g) (repr.loss=align), checked like ``read``; only
        sources with ``features`` have them."""
        raise SourceError(f"{type(self).__name__} stores no feature grids (shard with `pdiff shard --encode-features`)")

    def describe(self, i: int) -> str:
        """Where sample ``i`` lives, for error messages."""
        return f"sample {i}"

    def damage_hint(self) -> str:
        """What to do about a damaged sample, for error messages ("" if nothing to say)."""
        return ""

    def decode(self, i: int) -> np.ndarray:
        """Sample ``i`` as an (R, R, C) array of ``dtype``."""
        return self._decode(i, self.read(i))         # a read error names the place itself

    def _decode(self, i: int, data: bytes, rows: int | None = None) -> np.ndarray:
        try:
            return decode_sample(data, self.encoding, self.resolution, self.channels, self.dtype, rows=rows)
        except Exception as e:
            hint = self.damage_hint()
            raise CorruptSample(i,
                                f"{self.describe(i)} cannot be decoded: {e}" + (f"; {hint}" if hint else "")) from None

    def read_into(self, i: int, out: np.ndarray) -> None:
        """Uniform encodings: sample ``i`` into ``out`` (R x R x C of ``dtype``, contiguous)."""
        out[...] = self.decode(i)

    def read_region(self, i: int, x0: int, y0: int, size: int, out: np.ndarray) -> None:
        """Uniform encodings: the ``size`` x ``size`` region of sample ``i`` at (x0, y0) into ``out``.
        This reads (and checks) the whole sample; a source with random access overrides it to read
        only the region's rows (a checksum over the whole sample cannot be checked then)."""
        out[...] = self.decode(i)[y0:y0 + size, x0:x0 + size]

    def decode_region(self, i: int, x0: int, y0: int, size: int) -> np.ndarray:
        """The ``size`` x ``size`` region of sample ``i`` at (x0, y0), (size, size, C) of ``dtype``,
        with no decoding below it where the encoding allows (pipelines/regions.py): what the
        loaders crop. Bit for bit the region of ``decode(i)``."""
        if self.encoding in UNIFORM_ENCODINGS:
            out = np.empty((size, size, self.channels), self.dtype)
            self.read_region(i, x0, y0, size, out)
            return out
        rows = self._decode(i, top_rows(self.read(i), self.encoding, y0 + size), rows=y0 + size)
        return rows[y0:y0 + size, x0:x0 + size]

    def follow(self, plan, images_seen: int) -> None:
        """The pipeline delivers the step at ``images_seen`` of ``plan`` (pipelines/order.py) next: a
        source that fetches its data ahead of use (pipelines/remote.py) reads what comes from here."""

    def close(self) -> None:
        """Release open files (the source may be read again afterwards)."""
