"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", config G), taking image + coordinate channels.

Every layer keeps unit-variance activations at unit variance (the paper's Sec. 3 and appendix B):
  mp_silu (eq. 81), mp_sum (eq. 88), mp_cat (eq. 103), MPFourier (eq. 75), MPConv (eq. 47) whose
  weights are normalized in every forward (standard weight normalization) and, after every optimizer
  step, rescaled in place to unit norm per output channel (forced weight normalization, eq. 66:
  ``force_weight_norm_``); no biases, no group norms (pixel norm instead), learned gains that start
  at zero where a branch joins the signal (the embedding's per-block scale, the output).
Layout (level i works at resolution R >> i of the TRAINING resolution R, as in the other U-Nets):
  embedding: MPFourier(c_noise) -> MPConv -> (mp_sum with the label's MPConv) -> mp_silu
  encoder:   a constant channel joins the input (the image, then the x and y coordinates); level 0
             opens with a 3x3 MPConv, each later level with a downsampling block; num_blocks blocks
  decoder:   the deepest level opens with two blocks (the first attends), the others with an
             upsampling block; num_blocks + 1 blocks, each taking one encoder skip through mp_cat;
             a 3x3 MPConv with a zero-initialized gain closes.
Attention placement is fixed by the level index, so a patch of side s < R runs through the same blocks
and weights as the full image; the attention of a patch spans the patch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdiff.knobs import knob
from pdiff.network_config import NetworkConfig, Rule

from .layers import CoordFeatures, UNetBase, drop_labels


@dataclass
class EDM2Config(NetworkConfig):
    """network.arch=edm2. Defaults: EDM2's UNet (networks_edm2.py) at its img512-S width."""
    arch: str = knob("edm2", "the network, a name in pdiff.networks.NETWORKS; the other network.* keys are its own")
    model_channels: int = knob(192, "base channels (EDM2: XS 128, S 192, M 256, L 320, XL 384, XXL 448)")
    channel_mult: list[int] = knob([1, 2, 3, 4], "channels of each resolution level, in multiples of model_channels")
    channel_mult_noise: int = knob(0, "noise embedding width in multiples of model_channels (0 = channel_mult[0])")
    channel_mult_emb: int = knob(0, "embedding width in multiples of model_channels (0 = max(channel_mult))")
    num_blocks: int = knob(3, "residual blocks per resolution")
    attn_resolutions: list[int] = knob([16, 8], "resolutions (feature map sides) with self-attention")
    channels_per_head: int = knob(64, "channels per attention head")
    dropout: float = knob(0.0, "dropout probability in the residual blocks")
    label_balance: float = knob(0.5, "mp_sum balance of the noise (0) and class (1) embeddings")
    concat_balance: float = knob(0.5, "mp_cat balance of the decoder's skip (0) and main path (1)")
    res_balance: float = knob(0.3, "mp_sum balance of a block's main (0) and residual (1) branch")
    attn_balance: float = knob(0.3, "mp_sum balance of a block's main branch (0) and its attention (1)")
    clip_act: float = knob(256.0, "clip each block's output activations to [-clip_act, clip_act] (0 = off)")

    rules: ClassVar[tuple[Rule, ...]] = (
        ("model_channels", lambda v: v >= 1, "must be at least 1"),
        ("channel_mult", lambda v: len(v) >= 1 and min(v) >= 1,
         "must list at least one positive channel multiplier (one per resolution level)"),
        ("channel_mult_noise", lambda v: v >= 0, "must be >= 0 (0 = channel_mult[0])"),
        ("channel_mult_emb", lambda v: v >= 0, "must be >= 0 (0 = max(channel_mult))"),
        ("num_blocks", lambda v: v >= 1, "must be at least 1"),
        ("attn_resolutions", lambda v: all(r >= 1 for r in v), "must list positive resolutions"),
        ("channels_per_head", lambda v: v >= 1, "must be at least 1"),
        ("dropout", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        ("label_balance", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        ("concat_balance", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        ("res_balance", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        ("attn_balance", lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
        ("clip_act", lambda v: v >= 0, "must be >= 0 (0 = no clipping)"),
    )


# --------------------------------------------------------------------------------------------
# Magnitude-preserving operations

def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x scaled to unit root-mean-square over ``dim`` (default: all but the first), eps keeping a
    zero vector finite; the norm is taken in float32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU rescaled to unit magnitude for unit-normal input (eq. 81: E[silu(z)^2] = 0.596^2)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, rescaled so that independent unit-magnitude inputs give unit magnitude (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation weighting b's share by t (eq. 103): unit-magnitude parts stay unit magnitude
    whatever their widths."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


class MPFourier(nn.Module):
    """Fourier features of a scalar with random frequencies and phases, scaled to unit magnitude (eq. 75).
    The frequencies and phases are buffers: drawn once, saved with the weights, never trained."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """A bias-free linear layer (``kernel=()``) or 'same' convolution whose weight is normalized per
    output channel in every forward and scaled by gain / sqrt(fan_in) (eq. 47), so unit-magnitude
    inputs give unit-magnitude outputs at gain 1. ``force_weight_norm_`` (forced weight normalization,
    eq. 66) rescales the stored weight itself, after every optimizer step: the forward's
    normalization keeps the gradient orthogonal to the weight, this keeps its norm from growing, so
    the effective learning rate does not decay."""

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @torch.no_grad()
    def force_weight_norm_(self) -> None:
        self.weight.copy_(normalize(self.weight.to(torch.float32)))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def force_weight_norm_(module: nn.Module) -> int:
    """Forced weight normalization of every MPConv in ``module`` (after each optimizer step; EDM2 does
    the same copy at the start of each training forward). Returns how many layers it touched (0 for
    networks without MP layers: a no-op)."""
    layers = [m for m in module.modules() if isinstance(m, MPConv)]
    for layer in layers:
        layer.force_weight_norm_()
    return len(layers)


# --------------------------------------------------------------------------------------------
# The U-Net

class Block(nn.Module):
    """EDM2's encoder ('enc') or decoder ('dec') block (its Fig. 21): optional 2x resampling, pixel
    norm (encoder), two 3x3 MPConvs around the embedding's per-channel scale, mp_sum of the branches,
    optional self-attention (pixel-normed q, k, v), activation clipping."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256.0):
        super().__init__()
        if flavor not in ("enc", "dec") or resample not in ("keep", "up", "down"):
            raise ValueError(f"Block: flavor {flavor!r} / resample {resample!r}: expected enc|dec / keep|up|down")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.flavor, self.resample = flavor, resample
        # EDM2 has out_channels // channels_per_head heads, none below 64 channels: a small network
        # here attends with one head instead of silently not at all (the published sizes are unchanged).
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch. EDM2's resampling filter [1, 1]: a 2x2 box down, nearest-neighbour up.
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                     # pixel norm

        # Residual branch, scaled per channel by the embedding (gain 0 at the start: a scale of 1).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            # EDM2's channel layout of qkv: (head, channel, q|k|v); pixel norm over each head's channels.
            b, _, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)                       # (b, heads, c, hw) each
            y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
            y = self.attn_proj(y.transpose(2, 3).reshape(b, -1, h, w))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(UNetBase):
    block_types = (Block,)

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise: int = 0, channel_mult_emb: int = 0,
                 num_blocks: int = 3, attn_resolutions=(16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, label_dropout: float = 0.0, coord_freqs: int = 0, **block_kw):
        super().__init__(img_resolution, img_channels, label_dim, label_dropout, levels=len(channel_mult))
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels)
        self.emb_label = MPConv(label_dim, emb_channels) if label_dim else None

        # Encoder: image + (x, y) [+ their Fourier features] + EDM2's constant channel.
        self.coord_features = CoordFeatures(coord_freqs)
        width = img_channels + 2 + self.coord_features.extra_channels() + 1
        self.enc = nn.ModuleDict()
        for level, channels in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(width, channels, (3, 3))
                width = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(width, width, emb_channels, "enc", "down", **block_kw)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = Block(width, channels, emb_channels, "enc",
                                                            attention=res in attn_resolutions, **block_kw)
                width = channels

        # Decoder: every block named *_block<i> takes one skip.
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        self._takes_skip = []
        for level, channels in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(width, width, emb_channels, "dec", attention=True, **block_kw)
                self.dec[f"{res}x{res}_in1"] = Block(width, width, emb_channels, "dec", **block_kw)
                self._takes_skip += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = Block(width, width, emb_channels, "dec", "up", **block_kw)
                self._takes_skip.append(False)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = Block(width + skips.pop(), channels, emb_channels, "dec",
                                                            attention=res in attn_resolutions, **block_kw)
                self._takes_skip.append(True)
                width = channels
        self.out_conv = MPConv(width, img_channels, (3, 3))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        class_labels = self.check_input(x, noise_labels, class_labels)
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training).to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(self.label_dim)), t=self.label_balance)
        emb = mp_silu(emb)

        x = self.coord_features(x)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for module, takes_skip in zip(self.dec.values(), self._takes_skip):
            if takes_skip:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def build(cfg: EDM2Config, resolution: int, channels: int) -> EDM2UNet:
    """EDM2's U-Net for an ``EDM2Config`` (registered as "edm2" in pdiff/networks/__init__.py)."""
    return EDM2UNet(resolution, channels, label_dim=cfg.label_dim, model_channels=cfg.model_channels,
                    channel_mult=tuple(cfg.channel_mult), channel_mult_noise=cfg.channel_mult_noise,
                    channel_mult_emb=cfg.channel_mult_emb, num_blocks=cfg.num_blocks,
                    attn_resolutions=tuple(cfg.attn_resolutions), label_balance=cfg.label_balance,
                    concat_balance=cfg.concat_balance, label_dropout=cfg.label_dropout,
                    coord_freqs=cfg.coord_freqs if cfg.coord_embed == "fourier" else 0,
                    channels_per_head=cfg.channels_per_head, dropout=cfg.dropout, res_balance=cfg.res_balance,
                    attn_balance=cfg.attn_balance, clip_act=cfg.clip_act)
