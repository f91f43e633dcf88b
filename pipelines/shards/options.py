"""What `pdiff shard` is asked to do (``Options``, checked before anything is read) and the seeded order
the inputs are written in (``write_order``): shared by the writer (write.py) and by encode_vae.py,
which finds the images behind posterior shards in that order."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pdiff.pipelines.sample_source import ENCODINGS, LATENT_DTYPES
from pdiff.pipelines.shards.inputs import ShardInputError
from pdiff.pipelines.shards.preprocess import TRANSFORMS

LAYOUTS = ("nhwc", "nchw")
_ORDER_TAG = 0x0D3E


def write_order(count: int, shuffle_seed: int | None) -> np.ndarray:
    """Positions of the source's inputs in the order they are written: a permutation drawn from
    ``shuffle_seed``, or the source order for None."""
    if shuffle_seed is None:
        return np.arange(count)
    return np.random.default_rng([int(shuffle_seed), _ORDER_TAG]).permutation(count)


@dataclass
class Options:
    resolution: int | None = None         # None: taken from the first image (transform 'none' only)
    transform: str = "none"
    channels: int | str = "auto"          # 1, 3 or auto (the first image's: gray -> 1, else 3)
    encoding: str | None = None           # png | jpeg | webp | raw | latent (float arrays, or --encode-vae);
                                          # None: png, latent with encode_vae
    layout: str = "nhwc"                  # latent: the array's axes, nhwc or nchw
    dtype: str = "float16"                # latent: stored as float16 or float32
    latent_scale: float | None = None     # latent: the factor the latents already carry (recorded only); None: 1
    encode_vae: str | None = None         # images -> this VAE's posterior (a diffusers folder or hub id)
    vae_batch: int = 32                   # encode_vae: images per encoder pass
    encode_features: str | None = None    # a frozen encoder (encode_features.py): its grid is stored per sample
    features_batch: int = 32              # encode_features: images per encoder pass
    device: str = "auto"                  # encode_vae / encode_features: the encoder's device (auto: the GPU if any)
    quality: int = 95                     # jpeg / webp (webp 100 = lossless)
    max_count: int = 10_000               # samples per shard at most
    max_bytes: int = 1 << 30              # bytes per shard at most (one sample larger than this still gets a shard)
    min_shards: int = 1                   # at least this many shards (ranks x workers)
    name: str = "data"
    on_error: str = "stop"                # stop | skip
    workers: int = 0                      # 0: all cores
    shuffle_seed: int | None = 0          # inputs are written in this seeded random order; None: source order
    images_key: str | None = None         # .npz: the array of images (default: 'images', 'x' or the only 3/4-d array)
    labels_key: str | None = None         # .npz: the labels (default: 'labels' or 'y' if present)
    labels_file: str | None = None        # .npy source: labels in a separate .npy
    overwrite: bool = False
    progress: bool | None = None          # False: none; else a bar on a terminal, periodic lines elsewhere
    command: list[str] | None = None

    def __post_init__(self):
        if self.encoding is None:
            self.encoding = "latent" if self.encode_vae else "png"
        if self.latent_scale is None and not self.encode_vae:
            self.latent_scale = 1.0

    def check(self) -> None:
        if self.encode_vae:
            if self.encoding != "latent":
                raise ShardInputError(f"--encode-vae writes latent shards; drop --format {self.encoding}")
            if self.latent_scale is not None:
                raise ShardInputError("--latent-scale is for latents you encoded yourself; with --encode-vae the "
                                      "scale (and shift) come from the VAE's config")
            if self.channels not in ("auto", 3):
                raise ShardInputError(f"--channels {self.channels}: the VAE encodes RGB images (gray ones are "
                                      f"converted); drop --channels")
            if self.vae_batch < 1:
                raise ShardInputError(f"vae batch must be positive, got {self.vae_batch}")
        if self.encode_features:
            if self.encoding == "latent":
                raise ShardInputError("--encode-features stores features of images: not with --encode-vae or "
                                      "--format latent yet (shard the images, or see docs/representation.md)")
            if self.features_batch < 1:
                raise ShardInputError(f"features batch must be positive, got {self.features_batch}")
        if self.transform not in TRANSFORMS:
            raise ShardInputError(f"transform {self.transform!r} is not one of {', '.join(TRANSFORMS)}")
        if self.encoding not in ENCODINGS:
            raise ShardInputError(f"format {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        if self.channels not in (1, 3, "auto"):
            raise ShardInputError(f"channels must be 1, 3 or auto, got {self.channels!r}")
        if self.on_error not in ("stop", "skip"):
            raise ShardInputError(f"on-error must be stop or skip, got {self.on_error!r}")
        if self.layout not in LAYOUTS:
            raise ShardInputError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.dtype not in LATENT_DTYPES:
            raise ShardInputError(f"dtype {self.dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
        if self.encoding == "latent" and not self.encode_vae:
            if self.transform != "none":
                raise ShardInputError(f"--transform {self.transform}: latents are stored as given (no image "
                                      f"transforms); resize the images before encoding them, or drop --transform")
            if not (isinstance(self.latent_scale, (int, float)) and math.isfinite(self.latent_scale)
                    and self.latent_scale > 0):
                raise ShardInputError(f"latent scale must be a positive number, got {self.latent_scale!r}")
        if self.transform != "none" and not self.resolution:
            raise ShardInputError(f"--transform {self.transform} needs --resolution")
        if self.resolution is not None and self.resolution < 2:
            raise ShardInputError(f"resolution must be at least 2, got {self.resolution}")
        if not 1 <= self.quality <= 100:
            raise ShardInputError(f"quality must lie in 1..100, got {self.quality}")
        if self.max_count < 1 or self.max_bytes < 1 or self.min_shards < 1:
            raise ShardInputError("max-count, max-bytes and min-shards must be positive")
        if self.shuffle_seed is not None and (isinstance(self.shuffle_seed,
                                                         bool) or not isinstance(self.shuffle_seed, int)
                                              or self.shuffle_seed < 0):
            raise ShardInputError(f"seed must be a non-negative integer, got {self.shuffle_seed!r}")
        if not self.name or any(c in self.name for c in "./\\ "):
            raise ShardInputError(f"shard name {self.name!r} must be non-empty without dots, slashes or spaces")
