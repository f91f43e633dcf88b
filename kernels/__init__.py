"""Fused Triton kernels for the two memory-bound ends of a training step, and their dispatcher.

    backend = resolve_backend(cfg.train.kernels, device)      # "triton" | "torch"
    net_in = build_net_input(patches, sigma, offsets, R, seed=seed, images_seen=n, backend=backend)
    F = model.raw(net_in, sigma, labels)
    loss = edm_patch_loss(F, patches, sigma, seed=seed, images_seen=n, backend=backend).mean()

Patches are uint8 (B, s, s, C) HWC in [0, 255], what the pipelines deliver for images (a quarter of
the bytes of float32 cross to the device, and no normalized copy is written there): the kernels
normalize as they read, v -> (v - 127.5) * float32(1 / 127.5), the bits a float conversion before
them would give. Float (B, C, s, s) patches in [-1, 1] (latents, tests) are read as they are. Give
either ``noise`` (a (B, C, s, s) tensor) or ``seed`` and
``images_seen``, the training progress that keys a step's noise: the Triton kernels then draw
Philox noise in-kernel and the loss kernel regenerates the identical noise (see kernels/_philox.py;
``philox_noise`` materialises it). The torch backend with a seed draws from a torch.Generator seeded
by (seed, images_seen): the same in both calls of a step, but a different stream from the Philox
one. ``images_seen`` may be an int (passed to the kernel as a scalar argument: no host-to-device
copy) or a one-element device tensor, which is what to pass under torch.compile so that its changing
value does not trigger recompiles.

Both ops are torch.library ops (triton_op), so torch.compile(fullgraph=True) traces them without
graph breaks; the loss is differentiable with respect to F (a bf16 F from autocast is fine).
"""
from __future__ import annotations

import torch

from pdiff.errors import UserError

from ._common import interpreting
from ._triton import AVAILABLE as _TRITON, WHY_MISSING
from ._philox import philox_noise, rng_args, torch_backend_noise
from .edm_loss import EDMLoss, edm_loss_fused, edm_loss_ref
from .net_input import NetInput, chw_view, net_input_fused, net_input_ref

__all__ = ["resolve_backend", "triton_available", "build_net_input", "edm_patch_loss", "philox_noise", "net_input_ref",
           "edm_loss_ref"]


def triton_available() -> bool:
    """Whether Triton can be imported here (without it the torch references run everywhere)."""
    return _TRITON


class KernelsUnavailable(UserError, RuntimeError):
    """train.kernels=triton where the Triton kernels cannot run (no Triton, or no GPU)."""


def resolve_backend(mode: str, device) -> str:
    """train.kernels -> "triton" | "torch": 'auto' is Triton on CUDA (where Triton is installed) and the
    torch references elsewhere; 'triton' off CUDA needs TRITON_INTERPRET=1. (pdiff.config checks the
    config's value; this error is for direct callers.)"""
    if mode == "torch":
        return "torch"
    dev = torch.device(device)
    if mode == "auto":
        return "triton" if dev.type == "cuda" and triton_available() else "torch"
    if mode != "triton":
        raise ValueError(f"kernel backend must be one of auto, triton, torch (config key train.kernels), got {mode!r}")
    if not triton_available():
        raise KernelsUnavailable(f"train.kernels=triton but Triton cannot be imported ({WHY_MISSING}); install it "
                           f"(pip install triton) or use train.kernels=auto|torch")
    if dev.type != "cuda" and not interpreting():
        raise KernelsUnavailable(f"train.kernels=triton needs a CUDA device (got {dev}); set TRITON_INTERPRET=1 "
                           "to run the kernels in Triton's CPU interpreter (slow, for tests), or use "
                           "train.kernels=auto|torch")
    return "triton"


def _check_common(patches, sigma, noise, seed, images_seen, where):
    if patches.ndim != 4:
        raise ValueError(f"{where}: patches must be float (B, C, s, s) or uint8 (B, s, s, C), got shape "
                         f"{tuple(patches.shape)}")
    if patches.dtype != torch.uint8 and not patches.dtype.is_floating_point:
        raise ValueError(f"{where}: patches must be uint8 (HWC) or floating point (CHW), got {patches.dtype}")
    y = chw_view(patches)
    b, _, h, w = y.shape
    if h != w:
        raise ValueError(f"{where}: patches must be square, got {h}x{w} (uint8 patches are (B, s, s, C))")
    if sigma.numel() != b or not sigma.dtype.is_floating_point:
        raise ValueError(f"{where}: sigma must be a float tensor with one value per sample ({b}), got "
                         f"shape {tuple(sigma.shape)} {sigma.dtype}")
    if (noise is None) == (seed is None and images_seen is None):
        raise ValueError(f"{where}: give exactly one of noise= or (seed=, images_seen=)")
    if noise is None and (seed is None or images_seen is None):
        raise ValueError(f"{where}: in-kernel noise needs both seed= and images_seen=")
    if noise is not None and (tuple(noise.shape) != tuple(y.shape) or not noise.dtype.is_floating_point):
        raise ValueError(f"{where}: noise must be float with the patches' (B, C, s, s) shape {tuple(y.shape)}, "
                         f"got {tuple(noise.shape)} {noise.dtype}")
    return y, sigma.reshape(-1)


def _resolve(backend, device, tensors, where):
    backend = resolve_backend(backend, device)          # refuses unknown names and Triton on a CPU tensor
    if backend == "triton":
        for name, t in tensors.items():
            if t is not None and t.device != device:
                raise ValueError(f"{where}: {name} is on {t.device} but the patches are on {device}; "
                                 "the kernels read every input on the patches' device")
    return backend


def build_net_input(patches: torch.Tensor, sigma: torch.Tensor, offsets: torch.Tensor, resolution: int,
                    noise: torch.Tensor | None = None, seed: int | None = None, images_seen=None,
                    sigma_data: float = 0.5, out_dtype: torch.dtype = torch.float32,
                    channels_last: bool = False, backend: str = "auto") -> torch.Tensor:
    """Network input (B, C + 2, s, s): [c_in(sigma) (y + sigma n), x-grid, y-grid]."""
    y, sigma = _check_common(patches, sigma, noise, seed, images_seen, "build_net_input")
    if offsets.shape != (y.shape[0], 2) or offsets.dtype.is_floating_point:
        raise ValueError(f"build_net_input: offsets must be integer (B, 2) = (x0, y0), got "
                         f"{tuple(offsets.shape)} {offsets.dtype}")
    if resolution < max(2, y.shape[-1]):
        raise ValueError(f"build_net_input: resolution {resolution} is smaller than the patch size {y.shape[-1]}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"build_net_input: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    backend = _resolve(backend, patches.device, dict(sigma=sigma, offsets=offsets, noise=noise), "build_net_input")
    if backend == "torch":
        if noise is None:
            noise = torch_backend_noise(seed, images_seen, y.shape, patches.device)
        return net_input_ref(patches, sigma, offsets, resolution, noise, sigma_data, out_dtype, channels_last)
    images_seen_t, seed, images_seen = rng_args(seed, images_seen, patches.device) if noise is None else (None, 0, 0)
    args = (patches, sigma, offsets, noise, images_seen_t, seed, images_seen, int(resolution), float(sigma_data),
            out_dtype, bool(channels_last))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (patches, sigma, noise))
    return NetInput.apply(*args) if needs_grad else net_input_fused(*args)


def edm_patch_loss(F: torch.Tensor, patches: torch.Tensor, sigma: torch.Tensor,
                   noise: torch.Tensor | None = None, seed: int | None = None, images_seen=None,
                   sigma_data: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Per-sample loss (B,) = mean over C s s of lambda(sigma) (D - y)^2, differentiable w.r.t. F.

    With seed/images_seen it must be called with the same (seed, images_seen) as build_net_input for that
    step."""
    y, sigma = _check_common(patches, sigma, noise, seed, images_seen, "edm_patch_loss")
    if tuple(F.shape) != tuple(y.shape) or not F.dtype.is_floating_point:
        raise ValueError(f"edm_patch_loss: F must be float with the patches' (B, C, s, s) shape "
                         f"{tuple(y.shape)}, got {tuple(F.shape)} {F.dtype}")
    backend = _resolve(backend, patches.device, dict(F=F, sigma=sigma, noise=noise), "edm_patch_loss")
    if backend == "torch":
        if noise is None:
            noise = torch_backend_noise(seed, images_seen, y.shape, patches.device)
        return edm_loss_ref(F, patches, sigma, noise, sigma_data)
    images_seen_t, seed, images_seen = rng_args(seed, images_seen, patches.device) if noise is None else (None, 0, 0)
    if torch.is_grad_enabled() and F.requires_grad:
        return EDMLoss.apply(F, patches, sigma, noise, images_seen_t, seed, images_seen, float(sigma_data))
    return edm_loss_fused(F, patches, sigma, noise, images_seen_t, seed, images_seen, float(sigma_data), False)[0]
