"""Coordinate channels: each pixel's position in the FULL image (Patch Diffusion, Sec. 3.2).

Convention used everywhere in pdiff:
  * ``offsets`` is an integer tensor of shape (B, 2) holding ``(x0, y0)`` = (left column, top row)
    of each patch inside the R x R canvas.
  * The grid has two channels, channel 0 = x (column index) and channel 1 = y (row index), each
    normalised as ``(k / (R - 1) - 0.5) * 2``: the top-left pixel of the canvas is (-1, -1) and the
    bottom-right one (1, 1).
"""
from __future__ import annotations

import torch


def normalize_index(k: torch.Tensor, resolution: int) -> torch.Tensor:
    """Map pixel index k (any real, possibly outside [0, R-1]) to (k / (R - 1) - 0.5) * 2."""
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    return (k / (resolution - 1) - 0.5) * 2


def coord_grid(offsets: torch.Tensor, patch_size: int, resolution: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coordinate channels (B, 2, s, s) for patches of size s at ``offsets`` (B, 2) = (x0, y0)."""
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"offsets must have shape (B, 2) as (x0, y0), got {tuple(offsets.shape)}")
    device = offsets.device
    k = torch.arange(patch_size, device=device, dtype=torch.float64)
    cols = normalize_index(offsets[:, 0, None].to(torch.float64) + k, resolution)  # (B, s)
    rows = normalize_index(offsets[:, 1, None].to(torch.float64) + k, resolution)  # (B, s)
    b = offsets.shape[0]
    x = cols[:, None, :].expand(b, patch_size, patch_size)
    y = rows[:, :, None].expand(b, patch_size, patch_size)
    return torch.stack([x, y], dim=1).to(dtype)


def canvas_grid(batch: int, canvas: int, resolution: int, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Grid for sampling a whole canvas of size ``canvas`` with a model trained at ``resolution``.

    canvas == resolution gives the full training grid [-1, 1]. A larger canvas extends the grid
    beyond the training canvas on every side, centred on it, with the same pixel spacing, so the
    model extrapolates outwards (the training canvas sits in the middle of the sample).
    """
    start = -((canvas - resolution) // 2)
    offsets = torch.full((batch, 2), start, dtype=torch.int64, device=device)
    return coord_grid(offsets, canvas, resolution, dtype)


def crop(images: torch.Tensor, offsets: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reference crop: images (B, C, H, W) -> (B, C, s, s) at offsets (x0, y0) (a gather, no loop
    over the batch in Python)."""
    b, c, h, w = images.shape
    if (offsets < 0).any() or (offsets[:, 0] + patch_size > w).any() or (offsets[:, 1] + patch_size > h).any():
        raise ValueError(f"crop of size {patch_size} at offsets outside a {h}x{w} image")
    k = torch.arange(patch_size, device=images.device)
    rows = (offsets[:, 1, None] + k)[:, None, :, None].expand(b, c, patch_size, w)
    out = images.gather(2, rows)
    cols = (offsets[:, 0, None] + k)[:, None, None, :].expand(b, c, patch_size, patch_size)
    return out.gather(3, cols)


def random_offsets(batch: int, patch_size: int, resolution: int,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform crop positions over all valid positions 0..R-s (both ends included, no padding)."""
    n = resolution - patch_size + 1
    if n < 1:
        raise ValueError(f"patch size {patch_size} exceeds resolution {resolution}")
    return torch.randint(0, n, (batch, 2), generator=generator, device=device)
