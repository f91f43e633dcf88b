"""Representation losses on the patch a step trains on (the `repr` config section, docs/representation.md).

* dispersive (Wang & He 2025, "Diffuse and Disperse", their InfoNCE-L2 variant): on a block's activations
  z_i (flattened per sample, d values), L = log mean_{i,j} exp(-||z_i - z_j||^2 / (d tau)) over all B x B
  pairs of the (micro-)batch, i = j included, the squared distance taken per dimension as their release
  does. No positives, no parameters.
* align (REPA, Yu et al. 2024): a projection head (REPA's MLP: three layers with SiLU, applied per token,
  here as 1x1 convolutions) on a block's activations, and the negative cosine similarity of each token to
  a frozen encoder's feature grid over the same pixels, averaged over the tokens of a sample. The grid was
  computed once, at shard time (`pdiff shard --encode-features`); the step samples it over the patch's
  region (``feature_region``) with the patch's offsets, after the pipeline flipped it with the patch.

The block is a module of the network addressed by its ``named_modules()`` name (``enc.16x16_block0``);
a forward hook keeps its output while PatchLoss runs the network (``BlockTap``)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOSSES = ("none", "dispersive", "align")


class BlockTap:
    """Keeps a block's output while ``recording`` (PatchLoss's forward only: an EMA copy or a sampler
    running the same modules stores nothing). The hook is a closure, not a bound method, so that a
    deep copy of the network (the EMA) shares this tap instead of copying it."""

    def __init__(self, block: nn.Module):
        self.recording = False
        self.kept: list[torch.Tensor] = []
        tap = self

        def keep(module, args, output):
            if tap.recording:
                tap.kept.append(output[0] if isinstance(output, tuple) else output)
        self.handle = block.register_forward_hook(keep)

    def take(self) -> torch.Tensor:
        out = self.kept.pop()
        self.kept.clear()
        return out


class TappedNetwork(nn.Module):
    """The network with the block's output as a second result: what PatchLoss compiles when a repr
    term is on, so that the hook runs inside the compiled graph (no graph break)."""

    def __init__(self, net: nn.Module, tap: BlockTap):
        super().__init__()
        self.net = net
        self.__dict__["tap"] = tap       # not a submodule: holds no parameters

    def forward(self, x, c_noise, class_labels):
        self.tap.recording = True
        self.tap.kept.clear()
        out = self.net(x, c_noise, class_labels)
        self.tap.recording = False
        return out, self.tap.take()


def dispersive_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Wang & He's InfoNCE-L2 dispersive loss of a batch of activations (B, ...): a scalar, in float32."""
    z = z.reshape(z.shape[0], -1).float()
    d2 = torch.cdist(z, z).square() / z.shape[1]          # (B, B) squared distances per dimension
    return torch.logsumexp(-d2.flatten() / temperature, 0) - torch.log(torch.tensor(float(d2.numel())))


class ProjectionHead(nn.Module):
    """REPA's projector: Linear -> SiLU -> Linear -> SiLU -> Linear, per token (1x1 convolutions)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1),
                                    nn.SiLU(), nn.Conv2d(hidden, out_channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


def align_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's term per sample (B,): minus the cosine similarity of each token (B, C, h, w) to the
    target's, averaged over the h x w tokens."""
    cos = F.cosine_similarity(projected.float(), target.float(), dim=1)
    return -cos.flatten(1).mean(1)


def _sample_axis(start: torch.Tensor, patch_size: int, resolution: int, grid: int, count: int):
    """Bilinear sampling positions along one axis (roi_align, aligned=True): ``count`` samples evenly
    spread over the pixels [start, start + s) of a grid of ``grid`` cells covering ``resolution``
    pixels. Sample j sits at pixel start + (j + 1/2) s / count, i.e. grid coordinate
    u = (start + (j + 1/2) s / count) g / R - 1/2 (cell centres at integers, align_corners=True
    semantics of an index grid). Computed exactly in integers: u = N / D with
    N = 2 g count start + (2j + 1) s g - R count, D = 2 R count; returns the lower cell (b, count),
    the upper cell and the weight of the upper one. A position outside [0, g - 1] is clamped to the
    edge cell, as roi_align clamps. Where a sample falls on a cell centre its weight is exactly 0."""
    j = torch.arange(count, device=start.device)
    num = 2 * grid * count * start[:, None] + ((2 * j + 1) * patch_size * grid - resolution * count)[None]
    den = 2 * resolution * count
    low = torch.div(num, den, rounding_mode="floor")
    frac = (num - low * den).float() / den
    inside = (low >= 0) & (low < grid - 1)
    frac = torch.where(inside, frac, torch.zeros_like(frac))
    low = low.clamp(0, grid - 1)
    high = torch.where(inside, low + 1, low)
    return low, high, frac


def feature_region(grid: torch.Tensor, offsets: torch.Tensor, patch_size: int, resolution: int,
                   out_size: int) -> torch.Tensor:
    """The stored feature grid (b, C, g, g) of each row's (already flipped) image, sampled over the
    patch's pixels [x0, x0 + s) x [y0, y0 + s) at ``out_size`` x ``out_size`` points: torchvision's
    ``roi_align(aligned=True)`` of the box (x0, y0, x0 + s, y0 + s) at spatial scale g / R, with its
    default adaptive sampling ratio r = ceil(cells per output cell) (r x r bilinear samples averaged
    per output cell). Where g / R * s = out_size and the offsets fall on cell boundaries this is an
    exact crop of the grid (interpolation weights exactly 0); elsewhere bilinear. float32 out."""
    b, c, g, g2 = grid.shape
    if g != g2:
        raise ValueError(f"feature grids must be square, got {g}x{g2}")
    ratio = max(1, -(-patch_size * g // (resolution * out_size)))
    count = out_size * ratio
    grid = grid.float()
    x0, x1, fx = _sample_axis(offsets[:, 0].long(), patch_size, resolution, g, count)
    y0, y1, fy = _sample_axis(offsets[:, 1].long(), patch_size, resolution, g, count)
    top = grid.gather(2, y0[:, None, :, None].expand(b, c, count, g))
    bottom = grid.gather(2, y1[:, None, :, None].expand(b, c, count, g))
    along_y = top + fy[:, None, :, None] * (bottom - top)                  # (b, C, count, g)
    left = along_y.gather(3, x0[:, None, None, :].expand(b, c, count, count))
    right = along_y.gather(3, x1[:, None, None, :].expand(b, c, count, count))
    out = left + fx[:, None, None, :] * (right - left)                     # (b, C, count, count)
    if ratio > 1:
        out = out.view(b, c, out_size, ratio, out_size, ratio).mean((3, 5))
    return out


def feature_map(activation: torch.Tensor) -> torch.Tensor:
    """A block's output as a (B, C, h, w) map: a U-Net block's as it is; a transformer block's tokens
    (B, T, D) of a square window (row-major, as pdiff.networks.dit lays them out) as (B, D, n, n)."""
    if activation.ndim != 3:
        return activation
    b, t, d = activation.shape
    n = math.isqrt(t)
    if n * n != t:
        raise ValueError(f"repr.block: {t} tokens do not form a square window (token masking is on?)")
    return activation.transpose(1, 2).reshape(b, d, n, n)


class ReprTerm(nn.Module):
    """The repr term of a step: built from the config's `repr` section and the network; holds the
    projection head (align), which trains with the model but is no part of it (not in the EMA or
    the snapshots). ``forward(activation, features, offsets, patch_size)`` -> per-sample term (B,),
    unweighted (PatchLoss weighs it)."""

    def __init__(self, rcfg, resolution: int, block_channels: int, feature_channels: int = 0):
        super().__init__()
        self.kind, self.temperature, self.resolution = rcfg.loss, float(rcfg.temperature), resolution
        self.head = (ProjectionHead(block_channels, rcfg.head_channels, feature_channels)
                     if self.kind == "align" else None)

    def forward(self, activation, features, offsets, patch_size: int) -> torch.Tensor:
        activation = feature_map(activation)
        if self.kind == "dispersive":
            return dispersive_loss(activation, self.temperature).expand(activation.shape[0])
        projected = self.head(activation.float())
        target = feature_region(features, offsets, patch_size, self.resolution, projected.shape[-1])
        return align_loss(projected, target)


def block_channels(net: nn.Module, block: nn.Module, in_channels: int, resolution: int, label_dim: int) -> int:
    """The channel count of ``block``'s output, from one forward pass of the network on zeros."""
    tap = BlockTap(block)
    tap.recording = True
    try:
        p = next(net.parameters())
        x = torch.zeros(1, in_channels + 2, resolution, resolution, device=p.device)
        labels = torch.zeros(1, label_dim, device=p.device) if label_dim else None
        with torch.no_grad():
            net(x, torch.zeros(1, device=p.device), labels)
        return int(feature_map(tap.kept[-1]).shape[1])
    finally:
        tap.handle.remove()
