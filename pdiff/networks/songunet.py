"""The Song et al. (2021) score U-Net in EDM's two configurations, DDPM++ and NCSN++.

Layout (level i works at resolution R >> i of the TRAINING resolution R):
  mapping:  noise embedding (+ label) -> two SiLU linears -> emb (4 * model_channels wide)
  encoder:  level 0 opens with a 3x3 conv; each later level opens with a downsampling block; then
            ``num_blocks`` blocks at width model_channels * mult (attention where R >> i is listed)
  decoder:  the deepest level opens with two blocks (the first always attends); every other level
            opens with an upsampling block; then num_blocks + 1 blocks, each taking one encoder skip
            (channel concatenation), the last one attending where listed; level 0 closes with
            GroupNorm -> SiLU -> 3x3 conv.
NCSN++ adds a residual encoder path: the (coordinate-augmented) input is repeatedly downsampled by a
fused conv+filter and averaged into the main path at the start of every level.

Attention placement is fixed by the level index at construction, so a patch of size s < R runs
through exactly the same blocks and weights as a full R x R image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdiff.network_config import UNetConfig

from .layers import Conv2d, CoordFeatures, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, \
    UNetBase, add_decoder, add_encoder, drop_labels, run_decoder, unet_settings


@dataclass
class SongUNetConfig(UNetConfig):
    """network.arch=ddpmpp | ncsnpp: EDM's U-Net knobs (pdiff.network_config.UNetConfig); the two differ by fixed
    settings (the builders below), not by keys."""


class SongUNet(UNetBase):
    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 model_channels: int = 128, channel_mult=(1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10,
                 label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard",
                 resample_filter=(1, 1), coord_freqs: int = 0):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"SongUNet: embedding_type {embedding_type!r} is not positional or fourier")
        if encoder_type not in ("standard", "residual"):
            raise ValueError(f"SongUNet: encoder_type {encoder_type!r} is not standard or residual")
        super().__init__(img_resolution, img_channels, label_dim, label_dropout, levels=len(channel_mult))
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        # Song et al.'s initialisation as EDM states it: Xavier-uniform everywhere, "zero" layers at 1e-5
        # scale, attention qkv at sqrt(0.2).
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=list(resample_filter), resample_proj=True,
                     adaptive_scale=False, init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Input: image channels + (x, y), optionally widened by Fourier features of (x, y).
        self.coord_features = CoordFeatures(coord_freqs)
        in_channels = img_channels + 2 + self.coord_features.extra_channels()

        # Encoder. ``_enc_plan`` names each module and what it does, so forward needs no name parsing.
        # NCSN++'s residual path: the input, downsampled by a fused conv + filter at every level.
        aux_width = in_channels

        def residual_path(res, width):
            nonlocal aux_width
            conv = Conv2d(aux_width, width, 3, down=True, resample_filter=list(resample_filter),
                          fused_resample=True, **init)
            aux_width = width
            return [(f"{res}x{res}_aux_residual", conv, "residual")]

        self.enc = nn.ModuleDict()
        self._enc_plan, skip_widths, width = add_encoder(
            self.enc, in_channels, img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions,
            block, stem_width=model_channels, stem_init=init,
            after_down=residual_path if encoder_type == "residual" else None)

        # Decoder: EDM's, as in both U-Nets (layers.add_decoder).
        self.dec = nn.ModuleDict()
        self._dec_plan, width = add_decoder(self.dec, width, skip_widths, img_resolution, model_channels,
                                            channel_mult, num_blocks,
                                            lambda res, idx: idx == num_blocks and res in attn_resolutions, block)
        # Output layers, kept in ``dec`` under EDM's names so state dicts share EDM's keys.
        self._out_names = (f"{img_resolution}x{img_resolution}_aux_norm", f"{img_resolution}x{img_resolution}_aux_conv")
        self.dec[self._out_names[0]] = GroupNorm(width, eps=1e-6)
        self.dec[self._out_names[1]] = Conv2d(width, img_channels, 3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        class_labels = self.check_input(x, noise_labels, class_labels)
        # Mapping. The reference emits [sin, cos] (it swaps the halves of the embedding it computes).
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training).to(emb.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        x = self.coord_features(x)
        aux = x
        skips = []
        for name, kind in self._enc_plan:
            module = self.enc[name]
            if kind == "conv":
                x = module(x)
                skips.append(x)
            elif kind == "block":
                x = module(x, emb)
                skips.append(x)
            else:  # residual: the downsampled input path joins the level's first activation
                x = aux = (x + module(aux)) / math.sqrt(2)
                skips[-1] = x

        x = run_decoder(self.dec, self._dec_plan, x, skips, emb)
        norm, conv = (self.dec[n] for n in self._out_names)
        return conv(F.silu(norm(x)))


# EDM's train.py settings that tell DDPM++ and NCSN++ apart (both use the standard decoder); the
# builders are registered as "ddpmpp" and "ncsnpp" in pdiff/networks/__init__.py.
def build_ddpmpp(cfg, resolution: int, channels: int) -> SongUNet:
    return SongUNet(**unet_settings(cfg, resolution, channels), embedding_type="positional",
                    channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1))


def build_ncsnpp(cfg, resolution: int, channels: int) -> SongUNet:
    return SongUNet(**unet_settings(cfg, resolution, channels), embedding_type="fourier",
                    channel_mult_noise=2, encoder_type="residual", resample_filter=(1, 3, 3, 1))
