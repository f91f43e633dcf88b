"""Fused patch EDM loss and its gradient with respect to the network output F.

Per element, with x = y + sigma n (EDM eq. 2, Table 1):
  D - y = c_skip x + c_out F - y = (c_skip - 1) y + c_skip sigma n + c_out F
(the right-hand form avoids the cancellation of D - y at small sigma), and
  per-sample loss L_b = lambda / N * sum (D - y)^2,   N = C s s,
  dL_b / dF = 2 lambda c_out / N (D - y).
The loss is the last node of the graph, so the backward is that saved gradient scaled by the
incoming per-sample gradient. One pass reads F, y and (unless drawn in-kernel) n once, writes the
gradient once and a (B, tiles) table of partial sums; no D, residual or clean patch is stored.
Partial sums are reduced in a fixed order (no atomics), so the loss is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch

from pdiff.precond import c_out, c_skip, loss_weight

from ._common import counter_blocks, empty, empty_like, fast_math, launcher
from ._philox import rng_state
from ._triton import tl, triton, triton_op
from .net_input import channel_noise, chw_view, load_patch, patches_to_float, plane_offset, pixels_linear


@triton.jit(do_not_specialize=["seed", "images_seen"])
def _edm_loss_kernel(f_ptr, y_ptr, n_ptr, images_seen_ptr, sigma_ptr, part_ptr, g_ptr, seed, images_seen,
                     S, W: tl.constexpr, n_tiles, sigma_data, inv_count,
                     sf_b, sf_c, sf_h, sf_w, sy_b, sy_c, sy_h, sy_w, sn_b, sn_c, sn_h, sn_w,
                     sg_b, sg_c, sg_h, sg_w, s_sig,
                     C: tl.constexpr, IS_UINT8: tl.constexpr, HAS_NOISE: tl.constexpr,
                     SEEN_IN_TENSOR: tl.constexpr, WRITE_GRAD: tl.constexpr, F_LINEAR: tl.constexpr,
                     Y_LINEAR: tl.constexpr, N_LINEAR: tl.constexpr, G_LINEAR: tl.constexpr, BLOCK: tl.constexpr,
                     FAST_MATH: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    p = t * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)          # pixels of this program, in every plane
    mask = p < S
    # Per-sample coefficients in float64 (EDM Table 1), used in float32.
    s64 = tl.load(sigma_ptr + b * s_sig).to(tl.float64)
    sd = s64 * 0 + sigma_data
    den = s64 * s64 + sd * sd
    a = (-(s64 * s64) / den).to(tl.float32)                 # c_skip - 1
    bn = (sd * sd / den * s64).to(tl.float32)               # c_skip sigma
    co64 = s64 * sd / tl.sqrt(den)                          # c_out
    lam = den / (s64 * sd * s64 * sd)                       # lambda(sigma)
    co = co64.to(tl.float32)
    gcoef = (2.0 * lam * co64 * inv_count).to(tl.float32)
    f_base = f_ptr + b * sf_b
    y_base = y_ptr + b * sy_b
    n_base = n_ptr + b * sn_b
    g_base = g_ptr + b * sg_b
    seed, seen_lo, seen_hi = rng_state(seed, images_seen, images_seen_ptr, SEEN_IN_TENSOR)   # unused with HAS_NOISE
    acc = tl.zeros((4 * BLOCK,), dtype=tl.float32)
    for c in tl.static_range(C):
        y = load_patch(y_base, c, p, mask, W, sy_c, sy_h, sy_w, Y_LINEAR, IS_UINT8)
        n = channel_noise(n_base, c, p, mask, W, sn_c, sn_h, sn_w, N_LINEAR, HAS_NOISE,
                          seed, t, b.to(tl.int32) * C + c, seen_lo, seen_hi, BLOCK, FAST_MATH)
        f = tl.load(f_base + plane_offset(c, p, W, sf_c, sf_h, sf_w, F_LINEAR), mask=mask, other=0).to(tl.float32)
        r = a * y + bn * n + co * f                         # D - y
        if WRITE_GRAD:
            tl.store(g_base + plane_offset(c, p, W, sg_c, sg_h, sg_w, G_LINEAR),
                     (gcoef * r).to(g_base.dtype.element_ty), mask=mask)
        acc += tl.where(mask, r * r, 0.0)
    total = tl.sum(acc, axis=0) * (lam * inv_count).to(tl.float32)
    tl.store(part_ptr + b * n_tiles + t, total)


def launch_edm_loss(F, patches, sigma, noise, images_seen_t, seed, images_seen, sigma_data, write_grad):
    y = chw_view(patches)
    b, c, h, w = y.shape
    s_total = h * w
    block, n_tiles, num_warps = counter_blocks(s_total)
    partial = empty((b * n_tiles,), torch.float32, F.device)
    grad = empty_like(F) if write_grad else torch.empty((0,), dtype=F.dtype, device=F.device)
    g = grad if write_grad else F
    has_noise = noise is not None
    n = noise if has_noise else y
    kernel = launcher(_edm_loss_kernel, partial, F)
    if kernel is not None:
        sf, sy, sn, sg = F.stride(), y.stride(), n.stride(), g.stride()
        kernel[(b, n_tiles)](
            F, y, n, images_seen_t if images_seen_t is not None else sigma, sigma, partial, g, seed, images_seen,
            s_total, w, n_tiles, sigma_data, 1.0 / (c * s_total), *sf, *sy, *sn, *sg, sigma.stride(0),
            C=c, IS_UINT8=patches.dtype == torch.uint8, HAS_NOISE=has_noise, SEEN_IN_TENSOR=images_seen_t is not None,
            WRITE_GRAD=write_grad,
            F_LINEAR=pixels_linear(F, sf), Y_LINEAR=pixels_linear(y, sy), N_LINEAR=pixels_linear(n, sn),
            G_LINEAR=pixels_linear(g, sg), BLOCK=block, FAST_MATH=fast_math(), num_warps=num_warps)
    # One tile per sample (patches up to 45 px): the partial sums are the losses, no reduction launch.
    return (partial if n_tiles == 1 else partial.view(b, n_tiles).sum(1)), grad


@triton_op("pdiff::edm_loss", mutates_args=())
def edm_loss_op(F: torch.Tensor, patches: torch.Tensor, sigma: torch.Tensor, noise: Optional[torch.Tensor],
                images_seen_t: Optional[torch.Tensor], seed: int, images_seen: int, sigma_data: float,
                write_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss (B,), dL_b/dF with F's dtype and layout, or an empty tensor)."""
    return launch_edm_loss(F, patches, sigma, noise, images_seen_t, seed, images_seen, sigma_data, write_grad)


def edm_loss_fused(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """The registered op while torch.compile traces; the launcher itself in eager mode."""
    return edm_loss_op(*args) if torch.compiler.is_compiling() else launch_edm_loss(*args)


class EDMLoss(torch.autograd.Function):
    """Per-sample loss, differentiable with respect to F only (patches, noise, sigma are data)."""

    @staticmethod
    def forward(ctx, F, patches, sigma, noise, images_seen_t, seed, images_seen, sigma_data):
        loss, grad = edm_loss_fused(F, patches, sigma, noise, images_seen_t, seed, images_seen, sigma_data, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # One pass over the saved gradient (the scale is cast to its dtype, so a bf16 gradient is
        # not widened to float32 and back).
        return grad * grad_loss.reshape(-1, 1, 1, 1).to(grad.dtype), None, None, None, None, None, None, None


def _edm_loss_torch(F, patches, sigma, noise, sigma_data, dtype):
    y = patches_to_float(patches, dtype)
    s = sigma.to(dtype).reshape(-1, 1, 1, 1)
    d = c_skip(s, sigma_data) * (y + s * noise.to(dtype)) + c_out(s, sigma_data) * F.to(dtype)
    return (loss_weight(s, sigma_data) * (d - y) ** 2).flatten(1).mean(1)


def edm_loss_ref(F: torch.Tensor, patches: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                 sigma_data: float = 0.5) -> torch.Tensor:
    """The kernel's plain-torch reference, computed in float32 (also the torch backend): the
    per-sample loss (B,), mean over elements of lambda(sigma) (D - y)^2 with D = c_skip x + c_out F,
    D - y formed directly as EDM writes it."""
    return _edm_loss_torch(F, patches, sigma, noise, sigma_data, torch.float32)


def edm_loss_ref64(F, patches, sigma, noise, sigma_data=0.5):
    """The same per-sample loss in float64 throughout."""
    return _edm_loss_torch(F, patches, sigma, noise, sigma_data, torch.float64)
