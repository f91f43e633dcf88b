"""The ADM U-Net of Dhariwal & Nichol (2021) as EDM configures it.

Differences from the Song et al. U-Net (songunet.py): the embedding modulates each block with a
per-channel scale and shift (adaptive group norm), multi-head attention with 64 channels per head,
no sqrt(1/2) skip scaling, a parameter-free nearest/box resampler on the skip path of resampling
blocks, Kaiming-uniform initialisation at scale sqrt(1/3) with truly zero "zero" layers, and the
class embedding is added after the second mapping layer (no bias). Attention placement is decided
by level index (level i is resolution R >> i of the training resolution R), as in songunet.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdiff.network_config import UNetConfig

from .layers import Conv2d, CoordFeatures, GroupNorm, Linear, PositionalEmbedding, UNetBase, add_decoder, \
    add_encoder, drop_labels, run_decoder, unet_settings


@dataclass
class ADMConfig(UNetConfig):
    """network.arch=adm: EDM's U-Net knobs (pdiff.network_config.UNetConfig; the defaults are DDPM++'s, as the one
    flat network section had them: the published ADM sizes are in the imagenet256_latent preset)."""


class DhariwalUNet(UNetBase):
    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0.0, coord_freqs: int = 0):
        super().__init__(img_resolution, img_channels, label_dim, label_dropout, levels=len(channel_mult))
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                     init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        # Unit-variance class embeddings (kaiming_normal has std 1/sqrt(fan_in)).
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.coord_features = CoordFeatures(coord_freqs)
        in_channels = img_channels + 2 + self.coord_features.extra_channels()

        # Encoder: every module's output is a skip.
        self.enc = nn.ModuleDict()
        self._enc_plan, skip_widths, width = add_encoder(
            self.enc, in_channels, img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions,
            block, stem_width=model_channels * channel_mult[0], stem_init=init)

        # Decoder: EDM's, as in both U-Nets (layers.add_decoder).
        self.dec = nn.ModuleDict()
        self._dec_plan, width = add_decoder(self.dec, width, skip_widths, img_resolution, model_channels,
                                            channel_mult, num_blocks, lambda res, idx: res in attn_resolutions,
                                            block)
        self.out_norm = GroupNorm(width)
        self.out_conv = Conv2d(width, img_channels, 3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        class_labels = self.check_input(x, noise_labels, class_labels)
        emb = F.silu(self.map_layer0(self.map_noise(noise_labels)))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training).to(emb.dtype))
        emb = F.silu(emb)

        x = self.coord_features(x)
        skips = []
        for name, kind in self._enc_plan:
            module = self.enc[name]
            x = module(x) if kind == "conv" else module(x, emb)
            skips.append(x)

        x = run_decoder(self.dec, self._dec_plan, x, skips, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def build(cfg, resolution: int, channels: int) -> DhariwalUNet:
    """ADM for an ``ADMConfig`` (registered as "adm" in pdiff/networks/__init__.py)."""
    return DhariwalUNet(**unet_settings(cfg, resolution, channels))
