"""The differentiable part of a training step, as one module that DDP wraps and torch.compile
compiles: patches -> fused network input -> F -> fused weighted loss (per sample)."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from pdiff.kernels import build_net_input, edm_patch_loss

from .precond import EDMPrecond, c_noise


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, images seen, ...): the same parts, the same seed."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def resolve_precision(mode: str, device) -> str:
    """train.precision: "auto" is bf16 autocast on CUDA and fp32 elsewhere."""
    return mode if mode != "auto" else ("bf16" if torch.device(device).type == "cuda" else "fp32")


def net_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


class PatchLoss(nn.Module):
    def __init__(self, model: EDMPrecond, resolution: int, backend: str, net_dtype: torch.dtype,
                 channels_last: bool = False):
        super().__init__()
        self.model = model
        self.resolution = resolution
        self.backend = backend          # "triton" | "torch" (kernels.resolve_backend)
        self.net_dtype = net_dtype      # bf16 under autocast on CUDA, else fp32
        self.channels_last = channels_last  # the network input's memory layout (match the weights')
        self.use_network(model.net)

    def use_network(self, fn) -> None:
        """Run F through ``fn`` (e.g. torch.compile(model.net)); kept out of the submodules so the
        compiled wrapper's parameters are not registered twice."""
        self.__dict__["net_fn"] = fn

    def forward(self, patches, offsets, sigma, noise, class_labels, seed: int, step: int):
        """Per-sample loss (B,). ``noise`` is given on the torch path; on the Triton path it is
        None and both kernels regenerate the same Philox noise from (seed, step)."""
        sd = self.model.sigma_data
        kw = dict(noise=noise) if noise is not None else dict(seed=seed, images_seen=step)
        net_in = build_net_input(patches, sigma, offsets, self.resolution, sigma_data=sd,
                                 out_dtype=self.net_dtype, channels_last=self.channels_last,
                                 backend=self.backend, **kw)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.net_dtype == torch.bfloat16
                    else contextlib.nullcontext())
        with autocast:
            F = self.net_fn(net_in, c_noise(sigma), class_labels)
        return edm_patch_loss(F, patches, sigma, sigma_data=sd, backend=self.backend, **kw)
