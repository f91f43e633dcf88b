"""Building blocks shared by the Song et al. U-Net (DDPM++ / NCSN++) and the ADM U-Net, following the
layer definitions EDM uses (Karras et al. 2022, appendix F.2 and its reference code).

Every layer initialises itself with EDM's ``init_mode`` / ``init_weight`` / ``init_bias`` scheme so
that parameter shapes, counts and initial statistics match the published networks. Weights are cast
to the activation dtype at use, so a module kept in fp32 runs under bf16 activations (with or
without autocast).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def init_tensor(shape, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A random tensor with unit ``init_weight`` for one of EDM's four initialisation modes."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (2 * torch.rand(*shape) - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (2 * torch.rand(*shape) - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}; expected one of {', '.join(INIT_MODES)}")


def _param(shape, mode, fan_in, fan_out, scale) -> nn.Parameter:
    # A zero scale still draws (keeps the random stream identical to a non-zero scale) and multiplies.
    return nn.Parameter(init_tensor(shape, mode, fan_in, fan_out) * scale)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = _param([out_features, in_features], scale=init_weight, **fans)
        self.bias = _param([out_features], scale=init_bias, **fans) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


def _resample_kernel(taps) -> torch.Tensor:
    """Separable 2-D FIR kernel from 1-D taps, normalised to unit DC gain: (1, 1, k, k)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Conv2d(nn.Module):
    """Square 'same' convolution with optional 2x up- or downsampling by a FIR filter.

    ``kernel=0`` gives a parameter-free resampler (used by ADM's skip path). Unfused, the filter is
    applied before the convolution; ``fused_resample`` (NCSN++'s residual encoder path) convolves first
    with extra padding and then filters with stride 2, as the reference does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter=(1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = _param([out_channels, in_channels, kernel, kernel], scale=init_weight, **fans) if kernel else None
        self.bias = _param([out_channels], scale=init_bias, **fans) if kernel and bias else None
        # A fixed, persistent buffer as in the reference (it is part of the state dict there too).
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if up or down else None)

    def _filter(self, x: torch.Tensor, channels: int, pad: int) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype)
        if self.up:
            # Transposed depthwise conv; the factor 4 keeps the mean after zero-insertion.
            return F.conv_transpose2d(x, (f * 4).expand(channels, 1, -1, -1), groups=channels, stride=2, padding=pad)
        return F.conv2d(x, f.expand(channels, 1, -1, -1), groups=channels, stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        resample = self.up or self.down
        if resample and self.fused_resample and w is not None:
            if self.up:
                x = self._filter(x, self.in_channels, w_pad + f_pad)
                x = F.conv2d(x, w)
            else:
                x = F.conv2d(x, w, padding=w_pad + f_pad)
                x = self._filter(x, self.out_channels, 0)
        else:
            if resample:
                x = self._filter(x, self.in_channels, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm with EDM's group rule: 32 groups unless that leaves fewer than 4 channels a group."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        if num_channels % self.num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {self.num_groups} groups; "
                             "use a channel count divisible by it (e.g. a multiple of 32)")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Pre-activation residual block with noise-embedding modulation, optional 2x resampling and an
    optional self-attention layer after it; the union of what DDPM++, NCSN++ and ADM need.

    ``adaptive_scale``: the embedding gives a per-channel scale and shift after the second norm
    (ADM); otherwise it is a bias added before that norm (Song et al.). ``resample_proj``: the skip
    path of a resampling block has a 1x1 conv even when the width is unchanged (Song et al.).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter=(1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0.0)
        init_attn = init_attn if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        if attention:
            # EDM derives ADM's head count as width // 64, which is 0 (no attention at all) below 64
            # channels; at least one head keeps small test networks attending. Unchanged at >= 64.
            heads = num_heads if num_heads is not None else max(1, out_channels // channels_per_head)
            if out_channels % heads:
                raise ValueError(f"UNetBlock: {out_channels} channels do not split into {heads} attention heads")
        self.num_heads = heads if attention else 0

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            k = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, k, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        h = self.conv0(F.silu(self.norm0(x)))
        mod = self.affine(emb).to(h.dtype)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = mod.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + mod))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + shortcut) * self.skip_scale
        if self.num_heads:
            x = (self._attend(self.norm2(x)) + x) * self.skip_scale
        return x

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads = self.num_heads
        # The qkv conv's output channels are laid out (head, channel, {q,k,v}) as in the reference,
        # so checkpoints converted from it keep their meaning.
        qkv = self.qkv(x).reshape(b, heads, c // heads, 3, hgt * wid)
        # (3, b, heads, tokens, c/heads), copied so the channel dim has stride 1: the fused attention
        # kernels (flash / memory-efficient) require that, and without it SDPA silently falls back to
        # the fp32 math path (seen on an H200: batched fp32 GEMMs were the top kernels of ADM's step).
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        # softmax(q k^T / sqrt(d)) v; the fused kernels keep the softmax statistics in fp32.
        a = F.scaled_dot_product_attention(q, k, v)
        # Back to (b, c, h, w) in x's memory format. The reshape alone is a view with channels_last
        # strides, and a 1x1 conv on it returns its weight's gradient in that layout: under DDP the
        # gradient then no longer matches its bucket view ("Grad strides do not match").
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return self.proj(a.transpose(-1, -2).reshape(b, c, hgt, wid).contiguous(memory_format=layout))


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar per sample: [cos(x w_i), sin(x w_i)] with
    w_i = (1/max_positions)^(i/n), i < n = num_channels/2 (n-1 in the denominator with ``endpoint``)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"PositionalEmbedding: num_channels must be even, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        i = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (i / (half - (1 if self.endpoint else 0)))
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++): fixed Gaussian frequencies of std ``scale``."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"FourierEmbedding: num_channels must be even, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class CoordFeatures(nn.Module):
    """Optional sin/cos features of the two coordinate channels (the last two input channels).

    Output: image channels, raw (x, y), then for k = 0..n-1: sin(2^k pi x), cos(2^k pi x),
    sin(2^k pi y), cos(2^k pi y). ``num_freqs = 0`` passes the input through unchanged.
    """

    def __init__(self, num_freqs: int):
        super().__init__()
        if num_freqs < 0:
            raise ValueError(f"coord_freqs must be >= 0, got {num_freqs}")
        self.num_freqs = num_freqs
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32),
                             persistent=False)

    def extra_channels(self) -> int:
        return 4 * self.num_freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_freqs == 0:
            return x
        coords = x[:, -2:]                                                  # (B, 2, H, W)
        angles = coords[:, :, None] * self.freqs.to(x.dtype)[None, None, :, None, None]  # (B, 2, n, H, W)
        feats = torch.stack([angles.sin(), angles.cos()], dim=3)            # (B, 2, n, 2, H, W)
        # Order: frequency major, then axis, then sin/cos.
        feats = feats.permute(0, 2, 1, 3, 4, 5).reshape(x.shape[0], -1, x.shape[2], x.shape[3])
        return torch.cat([x, feats], dim=1)


# --------------------------------------------------------------------------------------------
# What the U-Nets share: their settings, encoder, decoder, input contract and label dropout

def unet_settings(cfg, resolution: int, channels: int) -> dict:
    """The constructor arguments both U-Nets take from a ``UNetConfig`` (pdiff/network_config.py)."""
    if len(cfg.channel_mult) < 1:
        raise ValueError("network.channel_mult: a U-Net needs at least one level")
    return dict(img_resolution=resolution, img_channels=channels, label_dim=cfg.label_dim,
                model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult),
                num_blocks=cfg.num_blocks, attn_resolutions=tuple(cfg.attn_resolutions),
                dropout=cfg.dropout, label_dropout=cfg.label_dropout,
                coord_freqs=cfg.coord_freqs if cfg.coord_embed == "fourier" else 0)


def add_encoder(enc: nn.ModuleDict, width: int, img_resolution: int, model_channels: int, channel_mult,
                num_blocks: int, attn_resolutions, block: dict, stem_width: int, stem_init: dict,
                after_down=None) -> tuple[tuple, list[int], int]:
    """Add EDM's U-Net encoder to ``enc``: level 0 opens with a 3x3 conv to ``stem_width``, every later
    level with a downsampling block, which ``after_down(res, width)`` may follow with more modules
    ((name, module, kind) triples: NCSN++'s residual input path); then ``num_blocks`` blocks at width
    model_channels * mult, attending at ``attn_resolutions``. Returns the plan ((name, kind) in order,
    kind "conv", "block" or the extra modules' own), the widths of the skips, and the width."""
    plan, skip_widths = [], []
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            enc[f"{res}x{res}_conv"] = Conv2d(width, stem_width, 3, **stem_init)
            plan.append((f"{res}x{res}_conv", "conv"))
            width = stem_width
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(width, width, down=True, **block)
            plan.append((f"{res}x{res}_down", "block"))
        skip_widths.append(width)
        if level > 0 and after_down is not None:
            for name, module, kind in after_down(res, width):
                enc[name] = module
                plan.append((name, kind))
        for idx in range(num_blocks):
            out = model_channels * mult
            enc[f"{res}x{res}_block{idx}"] = UNetBlock(width, out, attention=res in attn_resolutions, **block)
            plan.append((f"{res}x{res}_block{idx}", "block"))
            width = out
            skip_widths.append(width)
    return tuple(plan), skip_widths, width


def add_decoder(dec: nn.ModuleDict, width: int, skip_widths: list[int], img_resolution: int,
                model_channels: int, channel_mult, num_blocks: int, attends, block: dict) -> tuple[tuple, int]:
    """Add EDM's U-Net decoder to ``dec``: the deepest level opens with two blocks (the first always
    attends), every other level with an upsampling block; then num_blocks + 1 blocks, each taking
    one encoder skip (``skip_widths`` is consumed from the end). ``attends(res, idx)``: whether block
    idx at resolution res attends. Returns the plan ((name, takes a skip) in order) and the width."""
    plan = []
    for level in reversed(range(len(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            dec[f"{res}x{res}_in0"] = UNetBlock(width, width, attention=True, **block)
            dec[f"{res}x{res}_in1"] = UNetBlock(width, width, **block)
            plan += [(f"{res}x{res}_in0", False), (f"{res}x{res}_in1", False)]
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(width, width, up=True, **block)
            plan.append((f"{res}x{res}_up", False))
        for idx in range(num_blocks + 1):
            out = model_channels * channel_mult[level]
            dec[f"{res}x{res}_block{idx}"] = UNetBlock(width + skip_widths.pop(), out, attention=attends(res, idx),
                                                       **block)
            plan.append((f"{res}x{res}_block{idx}", True))
            width = out
    return tuple(plan), width


def run_decoder(dec: nn.ModuleDict, plan: tuple, x: torch.Tensor, skips: list, emb: torch.Tensor) -> torch.Tensor:
    for name, takes_skip in plan:
        if takes_skip:
            x = torch.cat([x, skips.pop()], dim=1)
        x = dec[name](x, emb)
    return x


class UNetBase(nn.Module):
    """What the U-Nets keep about their input (C + 2 channels, patch sizes a multiple of
    ``downsample``) and labels, the check of a forward call against it, and the names of their
    blocks (``block_names``)."""
    block_types: tuple = ()         # the modules in ``enc``/``dec`` that block_names lists (set below)

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, label_dropout: float, levels: int):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.downsample = 2 ** (levels - 1)

    def block_names(self) -> list[str]:
        """The network's blocks in forward order, each a path for ``get_submodule``: "enc.16x16_block0",
        "enc.8x8_down", "dec.8x8_in0", "dec.16x16_up", "dec.32x32_block3"... (the stem conv, NCSN++'s
        residual input path and the output layers are not blocks). A forward hook on one sees its
        output activations, (B, width, s >> level, s >> level) for a patch of side s at the level whose
        full-image side the name gives."""
        return [f"{part}.{name}" for part in ("enc", "dec") for name, module in getattr(self, part).items()
                if isinstance(module, self.block_types)]

    def check_input(self, x: torch.Tensor, noise_labels: torch.Tensor,
                    class_labels: torch.Tensor | None) -> torch.Tensor | None:
        """Validate a forward call (shapes only, so nothing here breaks a compiled graph) and return
        the class labels to use: all-zero ("unconditional") when the network is conditional and none
        came."""
        c, label_dim = self.img_channels, self.label_dim
        if x.ndim != 4 or x.shape[1] != c + 2:
            raise ValueError(f"network input must be (B, {c} + 2, H, W): {c} image channels then the x and y "
                             f"coordinate channels; got shape {tuple(x.shape)}")
        for size in (x.shape[2], x.shape[3]):
            if size % self.downsample:
                raise ValueError(f"patch size {size} is not a multiple of the network's downsampling factor "
                                 f"{self.downsample}")
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f"noise_labels must have shape ({x.shape[0]},), one per sample; "
                             f"got {tuple(noise_labels.shape)}")
        if label_dim == 0:
            return None  # unconditional network: any labels the caller has are not used
        if class_labels is None:
            return torch.zeros(x.shape[0], label_dim, device=x.device, dtype=torch.float32)
        if class_labels.shape != (x.shape[0], label_dim):
            raise ValueError(f"class_labels must be one-hot of shape ({x.shape[0]}, {label_dim}); "
                             f"got {tuple(class_labels.shape)}")
        return class_labels


UNetBase.block_types = (UNetBlock,)


def drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each sample's label vector with probability ``p`` while training (classifier-free
    guidance learns the unconditional model from the zero vector). Draws from torch's default
    generator of the labels' device."""
    if not training or p <= 0:
        return labels
    keep = torch.rand(labels.shape[0], 1, device=labels.device) >= p
    return labels * keep.to(labels.dtype)
