"""A diffusion transformer (DiT, Peebles & Xie 2023) that trains on windows of the token canvas.

A patch of side s at offset (x0, y0) of an R x R image is the window of (s/p)^2 tokens at that
place: every token keeps the 2-D sin-cos position of where it lies in the FULL canvas, so a
window is not a small image but a part of the big one, and a full-size window is exactly the
full-canvas forward. The positions come from the coordinate channels the patch pipeline already
builds (grid value g = (k / (R - 1) - 0.5) * 2 for pixel k, pdiff/coords.py): the network reads
the pixel index of each token's top-left pixel from them and does not take them as input
channels. Offsets need not be multiples of p: a token then sits at a fractional position, which
the sin-cos (and rotary) embeddings take as they are. On an extrapolation canvas (sampling larger
than R) the positions run past the training range, as the grid does.

Layout, as the DiT paper's: patchify (a p x p stride-p conv) + positions -> ``depth`` adaLN-Zero
blocks (attention through ``scaled_dot_product_attention``, flash kernels on a GPU; an MLP of
``mlp_ratio`` width) -> adaLN final layer -> unpatchify. Conditioning c = t_emb(c_noise) +
y_emb(label), where c_noise = ln(sigma)/4 is EDM's noise label and the label table has DiT's extra
"null" row that a dropped (all-zero) one-hot label selects.

Token masking (MaskDiT, Zheng et al. 2024): with ``keep`` given (the token indices each sample
keeps), the encoder blocks see only the kept tokens; a light decoder (``decoder_depth`` blocks)
puts a learned mask token at every dropped place and runs on the whole window. The output then
carries, at kept tokens, the denoiser F, and at dropped tokens a reconstruction of the network's
noisy input there (the MAE term; pdiff/step.py weights both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pdiff.knobs import knob
from pdiff.network_config import NetworkConfig, Rule

# DiT's sizes (depth, hidden width, heads); token sizes p in {2, 4, 8}: DiT-S/2, B/4, XL/2, ...
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
FREQUENCY_CHANNELS = 256  # DiT's timestep embedding: 256 sinusoids before the MLP


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., ) positions -> (..., dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (dim/2))
    (the MAE/DiT table, evaluated at any, also fractional, position)."""
    k = torch.arange(dim // 2, device=pos.device, dtype=torch.float64) / (dim / 2)
    omega = (1.0 / 10000 ** k).to(torch.float32)
    angle = pos.to(torch.float32).unsqueeze(-1) * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def sincos_2d(pos_x: torch.Tensor, pos_y: torch.Tensor, dim: int) -> torch.Tensor:
    """DiT's 2-D table: the first half of the channels encodes the column (x), the second the row."""
    return torch.cat([sincos_1d(pos_x, dim // 2), sincos_1d(pos_y, dim // 2)], dim=-1)


def token_positions(grid: torch.Tensor, resolution: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-canvas token positions (x, y), each (B, h, w) in token units, of a window whose
    coordinate channels are ``grid`` (B, 2, s, s). The pixel index of each token's top-left pixel is
    read back from the grid and rounded (exact in float32; in bf16 exact up to R ~ 256, and the
    row/column means below keep it exact well beyond), then divided by p."""
    g = grid.float()
    # A row of the x channel (and a column of the y channel) is one linear ramp: its mean fixes the
    # window's offset with the rounding errors of s values averaged out.
    s = g.shape[-1]
    half = (resolution - 1) / 2
    x0 = torch.round(((g[:, 0].mean(dim=(1, 2)) + 1) * half) - (s - 1) / 2)    # (B,)
    y0 = torch.round(((g[:, 1].mean(dim=(1, 2)) + 1) * half) - (s - 1) / 2)
    steps = torch.arange(0, s, p, device=g.device, dtype=torch.float32)
    px = (x0[:, None, None] + steps[None, None, :]) / p                        # (B, 1, w)
    py = (y0[:, None, None] + steps[None, :, None]) / p                        # (B, h, 1)
    h = w = s // p
    return px.expand(-1, h, w), py.expand(-1, h, w)


def rope_angles(pos_x: torch.Tensor, pos_y: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D axial rotary embedding: half of each head's channel pairs rotate with x, half with y
    (frequencies 100^(-k/n) over the n pairs of each axis). Returns cos, sin of shape (B, 1, T, head_dim/2)."""
    n = head_dim // 4
    freq = 100.0 ** (-torch.arange(n, device=pos_x.device, dtype=torch.float32) / n)
    ang = torch.cat([pos_x.reshape(pos_x.shape[0], -1, 1) * freq, pos_y.reshape(pos_y.shape[0], -1, 1) * freq], dim=-1)
    return ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)


def apply_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of q (B, heads, T, head_dim) by the angles' cos/sin."""
    q1, q2 = q.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([q1 * cos - q2 * sin, q1 * sin + q2 * cos], dim=-1).flatten(-2).to(q.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class DiTBlock(nn.Module):
    """adaLN-Zero: the conditioning gives shift, scale and a gate for attention and MLP; the gates
    start at zero, so every block starts as the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, p: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, p * p * channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """F(x, c_noise, labels) for EDM preconditioning: x (B, C + 2, s, s) = image channels and the
    coordinate channels of the window; returns (B, C, s, s). ``downsample`` = p: every window side
    must be a multiple of the token size."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, label_dropout: float = 0.0,
                 depth: int = 12, hidden: int = 384, heads: int = 6, token_size: int = 2, mlp_ratio: float = 4.0,
                 rope: bool = False, decoder_depth: int = 0, mask_ratio: float = 0.0, mae_weight: float = 0.1,
                 unmask_after_images: int = 0):
        super().__init__()
        if hidden % heads or (hidden // heads) % 4 and rope:
            raise ValueError(f"DiT: hidden width {hidden} must split into {heads} heads (of a multiple of 4 "
                             "channels with rope)")
        if hidden % 4:
            raise ValueError(f"DiT: hidden width {hidden} must be a multiple of 4 (the 2-D sin-cos table)")
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        self.p = self.downsample = token_size
        self.hidden, self.heads, self.rope = hidden, heads, rope
        # MaskDiT's training policy, read by pdiff.step.PatchLoss (token_keep, masked).
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"DiT: mask_ratio {mask_ratio} must be in [0, 1)")
        self.mask_ratio, self.mae_weight, self.unmask_after_images = mask_ratio, mae_weight, unmask_after_images
        self.x_embedder = nn.Conv2d(img_channels, hidden, token_size, stride=token_size)
        self.t_embedder = nn.Sequential(nn.Linear(FREQUENCY_CHANNELS, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # DiT's table has one row per class and a last "null" row that dropped labels use.
        self.y_embedder = nn.Parameter(torch.empty(label_dim + 1, hidden)) if label_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        # MaskDiT's decoder: a learned token for every dropped place, then a few more blocks.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden)) if decoder_depth else None
        self.decoder = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(decoder_depth))
        self.final_layer = FinalLayer(hidden, token_size, img_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialisation: Xavier-uniform linears with zero bias, the patch embedding like a
        # linear, N(0, 0.02) label table and timestep MLP, zero adaLN modulation and output layers.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        for block in [*self.blocks, *self.decoder, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def timestep_embedding(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = FREQUENCY_CHANNELS // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
        args = c_noise.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def conditioning(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(self.timestep_embedding(c_noise).to(self.t_embedder[0].weight.dtype))
        if self.y_embedder is not None:
            if class_labels is None:
                class_labels = torch.zeros(c_noise.shape[0], self.label_dim, device=c_noise.device)
            if self.training and self.label_dropout > 0:
                keep = torch.rand(class_labels.shape[0], 1, device=class_labels.device) >= self.label_dropout
                class_labels = class_labels * keep.to(class_labels.dtype)
            # one-hot rows pick their class; an all-zero row (no or a dropped label) picks the null row.
            hot = class_labels.to(self.y_embedder.dtype)
            c = c + hot @ self.y_embedder[:-1] + (1 - hot.sum(dim=1, keepdim=True)) * self.y_embedder[-1]
        return c

    def check_input(self, x: torch.Tensor) -> None:
        c = self.img_channels
        if x.ndim != 4 or x.shape[1] != c + 2:
            raise ValueError(f"network input must be (B, {c} + 2, H, W): {c} image channels then the x and y "
                             f"coordinate channels; got shape {tuple(x.shape)}")
        if x.shape[2] % self.p or x.shape[3] % self.p:
            raise ValueError(f"window {x.shape[2]}x{x.shape[3]} is not a multiple of the DiT's token size {self.p}")

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: (B, K) indices of the tokens each sample keeps (MaskDiT), or None for all."""
        self.check_input(x)
        b, s = x.shape[0], x.shape[2]
        h = w = s // self.p
        img, grid = x[:, :self.img_channels], x[:, self.img_channels:self.img_channels + 2]
        pos_x, pos_y = token_positions(grid, self.img_resolution, self.p)
        tokens = self.x_embedder(img).flatten(2).transpose(1, 2)                      # (B, T, D)
        tokens = tokens + sincos_2d(pos_x.reshape(b, -1), pos_y.reshape(b, -1), self.hidden).to(tokens.dtype)
        c = self.conditioning(noise_labels, class_labels).to(tokens.dtype)
        rope = rope_angles(pos_x, pos_y, self.hidden // self.heads) if self.rope else None
        if keep is None:
            if self.mask_token is not None:
                # The mask token is unused without masking: a zero term keeps it in the graph, so DDP
                # (which wants a gradient for every parameter) runs the unmasked phase too.
                tokens = tokens + 0 * self.mask_token.to(tokens.dtype)
            for block in [*self.blocks, *self.decoder]:
                tokens = block(tokens, c, rope)
        else:
            tokens = self._masked(tokens, c, keep, pos_x, pos_y)
        out = self.final_layer(tokens, c)                                             # (B, T, p*p*C)
        out = out.reshape(b, h, w, self.p, self.p, self.img_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.img_channels, s, s)

    def _masked(self, tokens, c, keep, pos_x, pos_y) -> torch.Tensor:
        b, t, d = tokens.shape
        index = keep.unsqueeze(-1).expand(-1, -1, d)
        kept = torch.gather(tokens, 1, index)
        rope_kept = None
        if self.rope:
            px = torch.gather(pos_x.reshape(b, -1), 1, keep)
            py = torch.gather(pos_y.reshape(b, -1), 1, keep)
            rope_kept = rope_angles(px, py, self.hidden // self.heads)
        for block in self.blocks:
            kept = block(kept, c, rope_kept)
        # Every place starts as the mask token plus its position; kept places get the encoder's tokens.
        full = self.mask_token.to(tokens.dtype).expand(b, t, d) + sincos_2d(
            pos_x.reshape(b, -1), pos_y.reshape(b, -1), d).to(tokens.dtype)
        full = full.scatter(1, index, kept)
        rope = rope_angles(pos_x, pos_y, self.hidden // self.heads) if self.rope else None
        for block in self.decoder:
            full = block(full, c, rope)
        return full


@dataclass
class DiTConfig(NetworkConfig):
    """network.arch=dit: a DiT on windows of the token canvas (docs/dit.md)."""
    arch: str = knob("dit", "the network, a name in pdiff.networks.NETWORKS; the other network.* keys are its own")
    size: str = knob("S", "DiT's size: S (12 blocks, 384 wide, 6 heads), B (12, 768, 12), L (24, 1024, 16), "
                          "XL (28, 1152, 16); depth/hidden/heads override it")
    token_size: int = knob(2, "p: a token is a p x p patch of the image (DiT: 2, 4, 8); patch sizes must be multiples")
    depth: int = knob(0, "transformer blocks (0 = the size's)")
    hidden: int = knob(0, "token width (0 = the size's)")
    heads: int = knob(0, "attention heads (0 = the size's)")
    mlp_ratio: float = knob(4.0, "MLP width in multiples of the token width")
    rope: bool = knob(False, "2-D rotary positions in attention, on top of the sin-cos table")
    mask_ratio: float = knob(0.0, "MaskDiT: share of a window's tokens dropped in training (0 = off)")
    decoder_depth: int = knob(0, "MaskDiT: blocks of the light decoder after the encoder (run on every token)")
    mae_weight: float = knob(0.1, "MaskDiT: weight of the dropped tokens' reconstruction of the noisy input")
    unmask_after_images: int = knob(0, "MaskDiT: no masking from this many images seen on (0 = mask throughout)")

    rules: ClassVar[tuple[Rule, ...]] = (
        ("coord_embed", lambda v: v == "none", "must be none: the DiT reads its token positions from the "
                                                 "coordinates (Fourier features are the U-Nets')"),
        ("size", lambda v: v in DIT_SIZES, f"must be one of {', '.join(DIT_SIZES)}"),
        ("token_size", lambda v: v >= 1, "must be at least 1 (DiT: 2, 4 or 8)"),
        ("depth", lambda v: v >= 0, "must be >= 0 (0 = the size's)"),
        ("hidden", lambda v: v >= 0 and v % 4 == 0, "must be >= 0 and a multiple of 4 (0 = the size's)"),
        ("heads", lambda v: v >= 0, "must be >= 0 (0 = the size's)"),
        ("mlp_ratio", lambda v: v > 0, "must be > 0"),
        ("mask_ratio", lambda v: 0 <= v < 1, "must lie in [0, 1)"),
        ("decoder_depth", lambda v: v >= 0, "must be >= 0"),
        ("mae_weight", lambda v: v >= 0, "must be >= 0"),
        ("unmask_after_images", lambda v: v >= 0, "must be >= 0 (0 = mask throughout)"),
    )


def dit_dims(cfg) -> tuple[int, int, int]:
    """(depth, hidden, heads) of a DiT config: the named size's, each overridden where set."""
    depth, hidden, heads = DIT_SIZES[cfg.size]
    return cfg.depth or depth, cfg.hidden or hidden, cfg.heads or heads


def build(cfg, resolution: int, channels: int) -> DiT:
    depth, hidden, heads = dit_dims(cfg)
    return DiT(resolution, channels, label_dim=cfg.label_dim, label_dropout=cfg.label_dropout, depth=depth,
               hidden=hidden, heads=heads, token_size=cfg.token_size, mlp_ratio=cfg.mlp_ratio, rope=cfg.rope,
               decoder_depth=cfg.decoder_depth, mask_ratio=cfg.mask_ratio, mae_weight=cfg.mae_weight,
               unmask_after_images=cfg.unmask_after_images)
