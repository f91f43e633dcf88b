"""Seed-addressed image generation: the image of seed s is the same whatever batch or process
samples it (EDM's generate.py convention).

Each seed owns a random stream (``SeedNoise``) from which, in order, its initial noise, its class
label (when the model is conditional and no class is fixed) and its churn noise are drawn.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .allocator import keep_freed_memory
from .config import SamplerConfig
from .model import one_hot_labels
from .monitor import image_grid
from .sampler import SeedNoise, sample_images


def parse_seeds(text: str) -> list[int]:
    """'0-49999', '0,5,10-19' -> the list of seeds in that order (ranges inclusive)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seed range {part!r}: end is before start")
            seeds.extend(range(lo, hi + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"seeds {text!r}: {part!r} is not a seed or a range like 0-49999")
    if not seeds:
        raise ValueError(f"seeds {text!r}: no seeds given")
    return seeds


@dataclass
class SampleOptions:
    """What to sample: sampler settings, class and canvas. ``canvas`` 0 = the training resolution."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    class_label: int | None = None      # fixed class for every seed; None = random per seed
    canvas: int = 0


def seed_labels(rng: SeedNoise, label_dim: int, class_label: int | None, device) -> torch.Tensor | None:
    """One-hot labels (B, label_dim): the fixed class, or one drawn from each seed's stream."""
    if label_dim == 0:
        if class_label is not None:
            raise ValueError(f"--class {class_label} given but the model is unconditional (network.label_dim = 0)")
        return None
    b = len(rng.generators)
    if class_label is None:
        idx = rng.randint(label_dim, [b, 1])[:, 0]
    else:
        if not 0 <= class_label < label_dim:
            raise ValueError(f"class {class_label} out of range: the model has {label_dim} classes "
                             f"(0..{label_dim - 1})")
        idx = torch.full((b,), class_label, dtype=torch.int64, device=device)
    return one_hot_labels(idx.to(device), label_dim)


@torch.no_grad()
def generate(model, seeds: Sequence[int], resolution: int, channels: int, label_dim: int,
             options: SampleOptions, device="cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one batch of seeds: images (B, C, H, W) float in about [-1, 1] and the integer
    labels (B,) or None."""
    canvas = options.canvas or resolution
    s = options.sampler
    if torch.device(device).type == "cpu":
        keep_freed_memory()         # else a third of the CPU time goes to re-faulting freed activations
    rng = SeedNoise(seeds, device=device)
    noise = rng.randn([len(seeds), channels, canvas, canvas])
    labels = seed_labels(rng, label_dim, options.class_label, device)
    images = sample_images(model, noise, resolution, labels, steps=s.steps, sigma_min=s.sigma_min,
                           sigma_max=s.sigma_max, rho=s.rho, guidance=s.guidance, s_churn=s.s_churn,
                           s_min=s.s_min, s_max=s.s_max, s_noise=s.s_noise, randn_like=rng.randn_like,
                           guidance_interval=s.guidance_interval)
    return images, (labels.argmax(1) if labels is not None else None)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, C, H, W) -> uint8 (B, C, H, W), as EDM rounds them."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def batches(seeds: Sequence[int], batch: int) -> list[list[int]]:
    if batch < 1:
        raise ValueError(f"batch size must be positive, got {batch}")
    return [list(seeds[i:i + batch]) for i in range(0, len(seeds), batch)]


def iter_uint8(model, seeds: Sequence[int], batch: int, resolution: int, channels: int, label_dim: int,
               options: SampleOptions, device="cpu", raw: bool = False, vae=None
               ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """(seeds, uint8 images NCHW on the device, labels) for each batch of ``seeds``. A latent model's
    samples are decoded by ``vae`` (a ``pdiff.vae.VAE``) first; with ``raw`` the sampler's float32
    output is given as it is (latents)."""
    for chunk in batches(seeds, batch):
        images, labels = generate(model, chunk, resolution, channels, label_dim, options, device)
        if raw:
            yield chunk, images, labels
        else:
            yield chunk, to_uint8(vae.decode(images) if vae is not None else images), labels


@torch.no_grad()
def sample_grid(model, cfg, device, count: int = 36, vae=None):
    """A grid (HWC uint8) of seeds 0..count-1 exactly as `pdiff sample --seeds 0-(count-1)` draws
    them: a latent model's samples decoded by ``vae`` (without one, the latents' first three
    channels)."""
    x, _ = generate(model, list(range(count)), cfg.data.resolution, cfg.data.channels,
                    cfg.network.label_dim, SampleOptions(sampler=cfg.sample), device)
    if vae is not None:
        x = vae.decode(x)
    return image_grid(x[:, :3] if x.shape[1] > 3 else x)
