"""Fused network input: [c_in(sigma) (y + sigma n), x-grid, y-grid] in one pass.

Each program owns one sample and a block of 4 * BLOCK pixels p of every channel (BLOCK Philox
counters j, pixels p = 4 j + k, see _philox.py). It reads each patch (and noise) element once and
writes each output element once; the coordinate channels are computed from (x0, y0) and p.
Per-sample coefficients are computed in float64, element math in float32.
"""
from __future__ import annotations

from typing import Optional

import torch

from pdiff.coords import coord_grid
from pdiff.precond import c_in

from ._common import counter_blocks, empty, fast_math, launcher
from ._philox import noise_block, philox_noise_op, rng_state
from ._triton import tl, triton, triton_op


@triton.jit
def plane_offset(c, p, W, s_c, s_h, s_w, LINEAR: tl.constexpr):
    """Element offset of pixel p of channel c inside one sample. LINEAR: rows follow each other
    (s_h = W s_w), so pixel p sits at p s_w: contiguous planes (s_w = 1, which Triton specialises
    to a constant, keeping the accesses vectorised), uint8 HWC and channels_last (s_w = C) alike."""
    if LINEAR:
        return c * s_c + p * s_w
    else:
        h = p // W
        return c * s_c + h * s_h + (p - h * W) * s_w


@triton.jit
def load_patch(y_base, c, p, mask, W, s_c, s_h, s_w, LINEAR: tl.constexpr, IS_UINT8: tl.constexpr):
    """Clean patch values in [-1, 1] as float32. uint8 pixels v map to (v - 127.5) * float32(1 / 127.5):
    the subtraction is exact and the product rounds once, the same bits as ``patches_to_float`` and
    the pipelines' float conversion gave (v / 127.5 - 1 differs in the last bit for 174 of 256 values)."""
    y = tl.load(y_base + plane_offset(c, p, W, s_c, s_h, s_w, LINEAR), mask=mask, other=0)
    if IS_UINT8:
        return (y.to(tl.float32) - 127.5) * (1.0 / 127.5)
    else:
        return y.to(tl.float32)


@triton.jit
def channel_noise(n_base, c, p, mask, W, s_c, s_h, s_w, LINEAR: tl.constexpr, HAS_NOISE: tl.constexpr,
                  seed, t, plane, seen_lo, seen_hi, BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    """The noise of channel c at pixels p: read from the given tensor, or drawn (Philox) for the
    plane. Both kernels take it from here, so the loss sees exactly what the input kernel used."""
    if HAS_NOISE:
        return tl.load(n_base + plane_offset(c, p, W, s_c, s_h, s_w, LINEAR), mask=mask, other=0).to(tl.float32)
    else:
        return noise_block(seed, t, plane, seen_lo, seen_hi, BLOCK, FAST_MATH)


@triton.jit(do_not_specialize=["seed", "images_seen"])
def _net_input_kernel(y_ptr, n_ptr, images_seen_ptr, sigma_ptr, off_ptr, out_ptr, seed, images_seen,
                      S, W: tl.constexpr, rm1, sigma_data,
                      sy_b, sy_c, sy_h, sy_w, sn_b, sn_c, sn_h, sn_w, so_b, so_c, so_h, so_w,
                      s_sig, s_off_b, s_off_c,
                      C: tl.constexpr, IS_UINT8: tl.constexpr, HAS_NOISE: tl.constexpr,
                      SEEN_IN_TENSOR: tl.constexpr, Y_LINEAR: tl.constexpr, N_LINEAR: tl.constexpr,
                      O_LINEAR: tl.constexpr,
                      BLOCK: tl.constexpr, FAST_MATH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    p = t * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)          # pixels of this program, in every plane
    mask = p < S
    sig64 = tl.load(sigma_ptr + b * s_sig).to(tl.float64)
    sd = sig64 * 0 + sigma_data             # float64 in compiled and interpreted runs alike
    cin = (1.0 / tl.sqrt(sig64 * sig64 + sd * sd)).to(tl.float32)   # EDM Table 1: c_in
    sigma = sig64.to(tl.float32)
    y_base = y_ptr + b * sy_b
    n_base = n_ptr + b * sn_b
    o_base = out_ptr + b * so_b
    out_ty = o_base.dtype.element_ty
    seed, seen_lo, seen_hi = rng_state(seed, images_seen, images_seen_ptr, SEEN_IN_TENSOR)   # unused with HAS_NOISE
    for c in tl.static_range(C):
        y = load_patch(y_base, c, p, mask, W, sy_c, sy_h, sy_w, Y_LINEAR, IS_UINT8)
        n = channel_noise(n_base, c, p, mask, W, sn_c, sn_h, sn_w, N_LINEAR, HAS_NOISE,
                          seed, t, b.to(tl.int32) * C + c, seen_lo, seen_hi, BLOCK, FAST_MATH)
        v = (y + sigma * n) * cin
        tl.store(o_base + plane_offset(c, p, W, so_c, so_h, so_w, O_LINEAR), v.to(out_ty), mask=mask)
    # Coordinates: (k / (R - 1) - 0.5) * 2 written as (2k - (R - 1)) / (R - 1): an exact integer
    # numerator and one correctly rounded division, so the fp32 result is the float64 reference rounded.
    x0 = tl.load(off_ptr + b * s_off_b).to(tl.int32)
    y0 = tl.load(off_ptr + b * s_off_b + s_off_c).to(tl.int32)
    h = p // W
    w = p - h * W
    den = rm1.to(tl.float32)
    gx = tl.div_rn((2 * (x0 + w) - rm1).to(tl.float32), den)
    gy = tl.div_rn((2 * (y0 + h) - rm1).to(tl.float32), den)
    tl.store(o_base + plane_offset(C, p, W, so_c, so_h, so_w, O_LINEAR), gx.to(out_ty), mask=mask)
    tl.store(o_base + plane_offset(C + 1, p, W, so_c, so_h, so_w, O_LINEAR), gy.to(out_ty), mask=mask)


def chw_view(patches: torch.Tensor) -> torch.Tensor:
    """Logical (B, C, H, W) view of the patches: uint8 ones are HWC, floats CHW."""
    if patches.ndim != 4:
        raise ValueError(f"patches must be 4-D (B, C, s, s) float or (B, s, s, C) uint8, got {tuple(patches.shape)}")
    return patches.permute(0, 3, 1, 2) if patches.dtype == torch.uint8 else patches


def pixels_linear(t: torch.Tensor, strides: tuple | None = None) -> bool:
    """True when the pixels of a (B, C, H, W) tensor's planes are evenly spaced, row after row
    (stride(2) == W * stride(3)): contiguous, channels_last and HWC tensors all are."""
    st = strides or t.stride()
    return st[2] == t.shape[3] * st[3]


def launch_net_input(patches, sigma, offsets, noise, images_seen_t, seed, images_seen, resolution, sigma_data,
                     out_dtype, channels_last):
    y = chw_view(patches)
    b, c, h, w = y.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = empty((b, c + 2, h, w), out_dtype, y.device, fmt)
    block, n_tiles, num_warps = counter_blocks(h * w)
    has_noise = noise is not None
    n = noise if has_noise else y
    kernel = launcher(_net_input_kernel, out, y)
    if kernel is None:
        return out
    sy, sn, so = y.stride(), n.stride(), out.stride()     # one call each: host time counts at small patches
    kernel[(b, n_tiles)](
        y, n, images_seen_t if images_seen_t is not None else sigma, sigma, offsets, out, seed, images_seen,
        h * w, w, resolution - 1, sigma_data, *sy, *sn, *so, sigma.stride(0), *offsets.stride(),
        C=c, IS_UINT8=patches.dtype == torch.uint8, HAS_NOISE=has_noise, SEEN_IN_TENSOR=images_seen_t is not None,
        Y_LINEAR=pixels_linear(y, sy), N_LINEAR=pixels_linear(n, sn), O_LINEAR=pixels_linear(out, so),
        BLOCK=block, FAST_MATH=fast_math(), num_warps=num_warps)
    return out


@triton_op("pdiff::net_input", mutates_args=())
def net_input_op(patches: torch.Tensor, sigma: torch.Tensor, offsets: torch.Tensor,
                 noise: Optional[torch.Tensor], images_seen_t: Optional[torch.Tensor], seed: int, images_seen: int,
                 resolution: int, sigma_data: float, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    return launch_net_input(patches, sigma, offsets, noise, images_seen_t, seed, images_seen, resolution,
                            sigma_data, out_dtype, channels_last)


def net_input_fused(*args) -> torch.Tensor:
    """The registered op while torch.compile traces; in eager mode the launcher itself, which skips
    the custom-op dispatch (tens of microseconds that matter at small patch batches)."""
    return net_input_op(*args) if torch.compiler.is_compiling() else launch_net_input(*args)


class NetInput(torch.autograd.Function):
    """Autograd around the fused kernel. Training never differentiates through the network input
    (patches, noise and sigma are data), but the gradients exist for completeness and tests:
    d/dy = c_in, d/dn = c_in sigma, d/dsigma = sum(g * (c_in n - sigma c_in^3 (y + sigma n)))."""

    @staticmethod
    def forward(ctx, patches, sigma, offsets, noise, images_seen_t, seed, images_seen, resolution, sigma_data,
                out_dtype, channels_last):
        out = net_input_fused(patches, sigma, offsets, noise, images_seen_t, seed, images_seen, resolution,
                              sigma_data, out_dtype, channels_last)
        ctx.save_for_backward(patches, sigma, noise, images_seen_t)
        ctx.sigma_data, ctx.seed, ctx.images_seen = sigma_data, seed, images_seen
        return out

    @staticmethod
    def backward(ctx, grad_out):
        patches, sigma, noise, images_seen_t = ctx.saved_tensors
        y = chw_view(patches)
        b, c, h, w = y.shape
        g = grad_out[:, :c].to(torch.float32)
        s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        cin = c_in(s, ctx.sigma_data)
        grad_y = grad_n = grad_sigma = None
        if ctx.needs_input_grad[0]:
            grad_y = (g * cin).to(patches.dtype)
        if ctx.needs_input_grad[3]:
            grad_n = (g * cin * s).to(noise.dtype)
        if ctx.needs_input_grad[1]:
            n = (noise.to(torch.float32) if noise is not None
                 else philox_noise_op(images_seen_t, ctx.seed, ctx.images_seen, b, c, h, w, patches.device))
            dv = cin * n - s * cin**3 * (patches_to_float(patches) + s * n)
            grad_sigma = (g * dv).sum((1, 2, 3)).to(sigma.dtype)
        return grad_y, grad_sigma, None, grad_n, None, None, None, None, None, None, None


def patches_to_float(patches: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, s, s) in [-1, 1] as ``dtype`` from either input format: uint8 HWC pixels v map to
    (v - 127.5) * (1 / 127.5), in float32 exactly what the kernels compute (see load_patch)."""
    if patches.dtype == torch.uint8:
        return (chw_view(patches).to(dtype) - 127.5) * (1 / 127.5)
    return patches.to(dtype)


def _net_input_torch(patches, sigma, offsets, resolution, noise, sigma_data, dtype):
    y = patches_to_float(patches, dtype)
    s = sigma.to(dtype).reshape(-1, 1, 1, 1)
    scaled = (y + s * noise.to(dtype)) * c_in(s, sigma_data)
    return torch.cat([scaled, coord_grid(offsets, y.shape[-1], resolution, dtype)], dim=1)


def net_input_ref(patches: torch.Tensor, sigma: torch.Tensor, offsets: torch.Tensor, resolution: int,
                  noise: torch.Tensor, sigma_data: float = 0.5, out_dtype: torch.dtype = torch.float32,
                  channels_last: bool = False) -> torch.Tensor:
    """The kernel's plain-torch reference, computed in float32 (also the torch backend):
    [c_in(sigma) (y + sigma n), x-grid, y-grid] for patches y (B, C, s, s) at offsets (B, 2)."""
    out = _net_input_torch(patches, sigma, offsets, resolution, noise, sigma_data, torch.float32).to(out_dtype)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def net_input_ref64(patches, sigma, offsets, resolution, noise, sigma_data=0.5):
    """The same function in float64 throughout (what the tests hold both versions against)."""
    return _net_input_torch(patches, sigma, offsets, resolution, noise, sigma_data, torch.float64)
