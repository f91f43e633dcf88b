"""Fused kernels against float64 references, on fresh random inputs.

Without CUDA the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before
the kernels are imported) at small shapes; with CUDA the same tests run the compiled kernels on the
GPU. Tolerances: float32 outputs within 1e-5 relative of float64 (plus 1e-6 absolute for values
near zero), bfloat16 outputs within 1e-2. Every kernel output is poisoned with NaN before the
launch, so an element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    if "kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            "tests/test_kernels.py: the kernels module was imported before TRITON_INTERPRET=1 could be "
            "set, so its Triton kernels need a GPU. Run this file on its own, or set TRITON_INTERPRET=1 "
            "in the environment (or in tests/conftest.py when CUDA is unavailable).")
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pdiff.kernels import (  # noqa: E402
    _common, build_net_input, edm_loss_ref, edm_patch_loss, net_input_ref, philox_noise, resolve_backend)
from pdiff.kernels.edm_loss import edm_loss_ref64  # noqa: E402
from pdiff.kernels.net_input import net_input_ref64  # noqa: E402
from pdiff.precond import c_in  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.kernels          # benchmarks/gpu_suite.sh runs these on CUDA


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture
def exact_convs(monkeypatch):
    """Full float32 convolutions on a GPU (TF32 would swamp the differences under test)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def fresh_generator() -> torch.Generator:
    """A newly seeded generator; the seed is printed so a failure can be replayed."""
    seed = torch.seed() % 2**31
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


def make_batch(b, c, s, resolution, uint8, gen, sigma_extremes=True):
    """Patches (uint8 HWC or float CHW), log-normal sigmas (with the sampler's extremes mixed in),
    offsets that touch both canvas edges."""
    if uint8:
        patches = torch.randint(0, 256, (b, s, s, c), generator=gen, dtype=torch.uint8)
    else:
        patches = torch.rand((b, c, s, s), generator=gen) * 2 - 1
    sigma = (torch.randn(b, generator=gen) * 1.2 - 1.2).exp()
    if sigma_extremes and b >= 3:
        sigma[0], sigma[-1] = 0.002, 80.0
    offsets = torch.randint(0, resolution - s + 1, (b, 2), generator=gen)
    offsets[0] = 0                                  # top-left corner of the canvas
    offsets[-1] = resolution - s                    # bottom-right corner
    if b >= 3:
        offsets[1] = torch.tensor([resolution - s, 0])
    noise = torch.randn((b, c, s, s), generator=gen)
    return patches.to(DEV), sigma.to(DEV), offsets.to(DEV), noise.to(DEV)


def assert_close_to64(actual, ref64, dtype, what):
    assert not actual.isnan().any(), f"{what}: unwritten (NaN-poisoned) or NaN elements"
    if dtype == torch.float32:
        torch.testing.assert_close(actual.double(), ref64, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    else:
        # bf16 keeps 8 bits: 1e-2 relative, and values far below the largest may round to zero.
        torch.testing.assert_close(actual.double(), ref64, rtol=1e-2, atol=1e-4 * ref64.abs().max().item(),
                                   msg=lambda m: f"{what}: {m}")


# (B, C, s, R, uint8 patches) covering s in {8, 16, 24, 32}, B in {1, 3, 7}, C in {1, 3, 4}.
SHAPES = [(1, 1, 8, 8, False), (3, 3, 16, 40, True), (7, 4, 24, 31, False), (3, 3, 32, 64, True),
          (7, 1, 16, 16, True), (1, 4, 32, 45, False), (3, 1, 24, 24, False), (7, 3, 8, 64, False)]


def test_resolve_backend(monkeypatch):
    assert resolve_backend("torch", "cuda") == "torch"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("triton", "cuda:0") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="train.kernels"):
        resolve_backend("cuda", "cpu")


@pytest.mark.parametrize("b,c,s,res,uint8", SHAPES)
def test_net_input_matches_float64(b, c, s, res, uint8):
    gen = fresh_generator()
    patches, sigma, offsets, noise = make_batch(b, c, s, res, uint8, gen)
    ref = net_input_ref64(patches, sigma, offsets, res, noise)
    # One float32 contiguous and one bfloat16 channels_last output per shape.
    for out_dtype, cl in ((torch.float32, False), (torch.bfloat16, True)):
        out = build_net_input(patches, sigma, offsets, res, noise=noise, out_dtype=out_dtype,
                              channels_last=cl, backend="triton")
        assert out.shape == (b, c + 2, s, s) and out.dtype == out_dtype
        assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        assert_close_to64(out, ref, out_dtype, f"net input {out_dtype} channels_last={cl}")
    # The coordinate channels sit exactly at the canvas edges for the corner offsets.
    if b > 1:
        assert out[0, c, 0, 0].item() == -1 and out[0, c + 1, 0, 0].item() == -1
    assert out[-1, c, -1, -1].item() == 1 and out[-1, c + 1, -1, -1].item() == 1


def float_as_before(patches_u8):
    """The float32 CHW patches the pipelines delivered before they handed over uint8: a lookup table
    of (v - 127.5) * float32(1 / 127.5) (the same bits in numpy, torch and DALI)."""
    lut = (np.arange(256, dtype=np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)
    return torch.from_numpy(lut[patches_u8.cpu().numpy().transpose(0, 3, 1, 2)]).to(patches_u8.device)


def test_net_input_torch_backend_is_the_core_reference():
    gen = fresh_generator()
    patches, sigma, offsets, noise = make_batch(3, 3, 16, 32, True, gen)
    got = build_net_input(patches, sigma, offsets, 32, noise=noise, backend="torch")
    assert torch.equal(got, net_input_ref(float_as_before(patches), sigma, offsets, 32, noise))
    assert_close_to64(got, net_input_ref64(patches, sigma, offsets, 32, noise), torch.float32, "torch backend")


@pytest.mark.parametrize("seeded", [False, True])
def test_net_input_gradients(seeded):
    gen = fresh_generator()
    b, c, s, res = 3, 3, 16, 40
    patches, sigma, offsets, noise = make_batch(b, c, s, res, False, gen, sigma_extremes=False)
    if seeded:
        noise = philox_noise(11, 5, (b, c, s, s), DEV)
    weights = torch.randn((b, c + 2, s, s), generator=gen).to(DEV)
    leaves = [patches.clone().requires_grad_(), sigma.clone().requires_grad_()]
    if seeded:
        out = build_net_input(leaves[0], leaves[1], offsets, res, seed=11, images_seen=5, backend="triton")
    else:
        leaves.append(noise.clone().requires_grad_())
        out = build_net_input(leaves[0], leaves[1], offsets, res, noise=leaves[2], backend="triton")
    (out * weights).sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    n64 = leaves64[2] if not seeded else noise.double()
    ref = net_input_ref64(leaves64[0], leaves64[1], offsets, res, n64)
    (ref * weights.double()).sum().backward()
    for got, want, name in zip(leaves, leaves64, ("patches", "sigma", "noise")):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5 * want.grad.abs().max().item(),
                                   msg=lambda m, name=name: f"d/d{name}: {m}")


LOSS_CASES = [  # (B, C, s, uint8, F dtype, F channels_last, seeded)
    (1, 1, 8, False, torch.float32, False, False), (3, 3, 16, True, torch.float32, True, True),
    (7, 4, 24, False, torch.bfloat16, False, True), (3, 3, 32, True, torch.bfloat16, True, False),
    (7, 1, 32, False, torch.float32, False, True), (1, 4, 16, True, torch.float32, False, False),
    (3, 4, 8, False, torch.float32, True, False), (7, 3, 16, True, torch.bfloat16, False, True)]


@pytest.mark.parametrize("b,c,s,uint8,f_dtype,f_cl,seeded", LOSS_CASES)
def test_loss_and_gradient_match_float64(b, c, s, uint8, f_dtype, f_cl, seeded):
    gen = fresh_generator()
    patches, sigma, _, noise = make_batch(b, c, s, 2 * s, uint8, gen)
    seed, seen = int(torch.randint(0, 2**62, (1,), generator=gen)), int(torch.randint(0, 2**40, (1,), generator=gen))
    if seeded:
        noise = philox_noise(seed, seen, (b, c, s, s), DEV)
    F = torch.randn((b, c, s, s), generator=gen).to(DEV, f_dtype)
    if f_cl:
        F = F.contiguous(memory_format=torch.channels_last)
    F.requires_grad_()
    kw = dict(seed=seed, images_seen=seen) if seeded else dict(noise=noise)
    loss = edm_patch_loss(F, patches, sigma, backend="triton", **kw)
    upstream = torch.rand(b, generator=gen).to(DEV) + 0.5       # a weighted batch loss
    (loss * upstream).sum().backward()

    F64 = F.detach().double().requires_grad_()
    ref = edm_loss_ref64(F64, patches, sigma, noise)
    (ref * upstream.double()).sum().backward()

    assert loss.shape == (b,) and loss.dtype == torch.float32
    assert_close_to64(loss, ref, torch.float32, "per-sample loss")
    assert F.grad.dtype == f_dtype and F.grad.stride() == F.stride()
    tol = 1e-5 if f_dtype == torch.float32 else 1e-2
    assert not F.grad.isnan().any(), "gradient has unwritten (NaN-poisoned) elements"
    torch.testing.assert_close(F.grad.double(), F64.grad, rtol=tol, atol=tol * F64.grad.abs().max().item())
    with torch.no_grad():
        again = edm_patch_loss(F, patches, sigma, backend="triton", **kw)
    assert torch.equal(again, loss.detach()), "loss without the gradient pass differs (or is not deterministic)"


def check_both_float32(patches, sigma, offsets, res, noise, F, rng: dict):
    """Both kernels (noise given or drawn as ``rng`` says; ``noise`` is what they use) against
    float64: the network input, the per-sample loss and its gradient with respect to F."""
    out = build_net_input(patches, sigma, offsets, res, backend="triton", **rng)
    assert_close_to64(out, net_input_ref64(patches, sigma, offsets, res, noise), torch.float32, "net input")
    F = F.requires_grad_()
    loss = edm_patch_loss(F, patches, sigma, backend="triton", **rng)
    loss.sum().backward()
    F64 = F.detach().double().requires_grad_()
    ref = edm_loss_ref64(F64, patches, sigma, noise)
    ref.sum().backward()
    assert_close_to64(loss, ref, torch.float32, "loss")
    torch.testing.assert_close(F.grad.double(), F64.grad, rtol=1e-5, atol=1e-5 * F64.grad.abs().max().item())


def test_crops_of_larger_tensors(monkeypatch):
    """Patches, noise and F that are windows into larger tensors (rows not following each other,
    stride(2) != W * stride(3)) take the kernels' general row/column addressing; several tiles per
    plane too. Both kernels against float64, forward and gradient."""
    import pdiff.kernels._common  # noqa: F401
    monkeypatch.setattr(pdiff.kernels._common, "lane_block", lambda q: 16)
    gen = fresh_generator()
    b, c, s, res = 3, 3, 12, 30
    for uint8 in (True, False):
        patches, sigma, offsets, _ = make_batch(b, c, s, res, uint8, gen)
        big = (torch.randint(0, 256, (b, s + 5, s + 7, c), generator=gen, dtype=torch.uint8) if uint8
               else torch.rand((b, c, s + 5, s + 7), generator=gen) * 2 - 1).to(DEV)
        patches = big[:, 2:2 + s, 3:3 + s] if uint8 else big[..., 2:2 + s, 3:3 + s]
        noise = torch.randn((b, c, s + 1, s + 4), generator=gen).to(DEV)[..., 1:, 2:2 + s]
        from pdiff.kernels.net_input import chw_view, pixels_linear
        assert not pixels_linear(chw_view(patches)) and not pixels_linear(noise)
        F = torch.randn((b, c, s + 3, s + 3), generator=gen).to(DEV)[..., 3:, :s]
        check_both_float32(patches, sigma, offsets, res, noise, F, dict(noise=noise))


@pytest.mark.parametrize("s", [7, 20])
def test_odd_sizes_and_many_tiles(monkeypatch, s):
    """Patch sizes whose plane is not a multiple of 4 (the last Philox call's 4 pixels partly masked)
    and 16 counters (64 pixels) per program: several tiles per sample, a ragged last tile, partial sums."""
    import pdiff.kernels._common  # noqa: F401
    monkeypatch.setattr(pdiff.kernels._common, "lane_block", lambda q: 16)
    gen = fresh_generator()
    b, c, res = 3, 3, 2 * s + 1
    patches, sigma, offsets, noise = make_batch(b, c, s, res, False, gen)
    for seeded in (False, True):
        if seeded:
            noise = philox_noise(21, 4, (b, c, s, s), DEV)
        kw = dict(seed=21, images_seen=4) if seeded else dict(noise=noise)
        F = torch.randn((b, c, s, s), generator=gen).to(DEV)
        check_both_float32(patches, sigma, offsets, res, noise, F, kw)


def test_loss_torch_backend_is_the_core_reference():
    gen = fresh_generator()
    patches, sigma, _, noise = make_batch(3, 3, 16, 32, True, gen)
    F = torch.randn((3, 3, 16, 16), generator=gen).to(DEV)
    got = edm_patch_loss(F, patches, sigma, noise=noise, backend="torch")
    assert torch.equal(got, edm_loss_ref(F, float_as_before(patches), sigma, noise))


@pytest.mark.skipif(CUDA, reason="bit identity holds where no FMA contraction runs (CPU); "
                                 "tests/test_kernels_cuda.py checks the compiled kernels to 1 ulp")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("seeded", [False, True])
def test_uint8_patches_give_the_float_paths_bits(backend, seeded):
    """uint8 to the device: the network input (float32 and bf16 channels_last), the per-sample loss
    and its gradient from uint8 HWC patches equal, bit for bit, what the float32 CHW patches that the
    pipelines delivered before gave: the kernels and the torch path normalize with the same float ops."""
    gen = fresh_generator()
    b, c, s, res = 5, 3, 16, 40
    patches, sigma, offsets, noise = make_batch(b, c, s, res, True, gen)
    before = float_as_before(patches)
    seed, seen = int(torch.randint(0, 2**62, (1,), generator=gen)), int(torch.randint(0, 2**40, (1,), generator=gen))
    kw = dict(seed=seed, images_seen=seen) if seeded else dict(noise=noise)
    for out_dtype, cl in ((torch.float32, False), (torch.bfloat16, True)):
        a = build_net_input(patches, sigma, offsets, res, out_dtype=out_dtype, channels_last=cl, backend=backend, **kw)
        want = build_net_input(before, sigma, offsets, res, out_dtype=out_dtype, channels_last=cl, backend=backend,
                               **kw)
        assert torch.equal(a, want) and a.stride() == want.stride()
    F = torch.randn((b, c, s, s), generator=gen).to(DEV)
    losses, grads = [], []
    for y in (patches, before):
        f = F.clone().requires_grad_()
        loss = edm_patch_loss(f, y, sigma, backend=backend, **kw)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(f.grad)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])


# --- in-kernel noise -------------------------------------------------------------------------------

def test_philox_noise_is_standard_normal():
    from scipy import stats
    seed = int(torch.randint(0, 2**62, (1,)))
    print(f"philox seed {seed}")
    draws = torch.cat([philox_noise(seed, seen, (4, 3, 32, 32), DEV).flatten() for seen in range(4)]).double().cpu()
    n = draws.numel()                                            # 49152 draws
    assert abs(draws.mean().item()) < 6 / n**0.5
    assert abs(draws.var().item() - 1) < 6 * (2 / n) ** 0.5
    assert stats.kstest(draws.numpy(), "norm").pvalue > 1e-6
    # Box-Muller clamps u at 1e-7: tails stop near 5.7 sigma, nothing wilder.
    assert draws.abs().max().item() < 5.8


def _corr(a, b):
    a, b = a.flatten().double() - a.mean(), b.flatten().double() - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_philox_noise_independent_across_seeds_steps_samples_and_channels():
    seed = int(torch.randint(0, 2**62, (1,)))
    seen = int(torch.randint(0, 2**40, (1,)))
    print(f"philox seed {seed} seen {seen}")
    shape = (3, 2, 24, 24)
    base = philox_noise(seed, seen, shape, DEV)
    assert torch.equal(base, philox_noise(seed, seen, shape, DEV)), "same (seed, seen) must give the same noise"
    bound = 6 / base.numel() ** 0.5
    others = {"seed+1": philox_noise(seed + 1, seen, shape, DEV),
              "seen+1": philox_noise(seed, seen + 1, shape, DEV),
              "seen+2^32": philox_noise(seed, seen + 2**32, shape, DEV)}
    for name, other in others.items():
        assert abs(_corr(base, other)) < bound, f"noise correlated with {name}"
    per_plane = base.reshape(6, -1)
    for i in range(6):
        for j in range(i + 1, 6):
            assert abs(_corr(per_plane[i], per_plane[j])) < 6 / per_plane.shape[1] ** 0.5
    # Adjacent pixels of one plane, and the four outputs of one Philox call (pixels 4j .. 4j + 3).
    flat = base.reshape(6, -1)
    assert abs(_corr(flat[:, :-1], flat[:, 1:])) < bound
    calls = flat.reshape(6, -1, 4)
    for k in range(1, 4):
        assert abs(_corr(calls[..., 0], calls[..., k])) < 6 / calls[..., 0].numel() ** 0.5, f"output 0 vs {k}"
    # A sample's noise depends on its index, not on the batch around it.
    assert torch.equal(philox_noise(seed, seen, (5, 2, 24, 24), DEV)[:3], base)


@pytest.mark.parametrize("uint8,s", [(True, 16), (False, 24)])
def test_loss_kernel_regenerates_the_input_kernels_noise(uint8, s):
    gen = fresh_generator()
    b, c, res = 3, 3, 2 * s
    patches, sigma, offsets, _ = make_batch(b, c, s, res, uint8, gen, sigma_extremes=False)
    seed, seen = int(torch.randint(0, 2**62, (1,), generator=gen)), int(torch.randint(0, 2**40, (1,), generator=gen))
    noise = philox_noise(seed, seen, (b, c, s, s), DEV)
    seeded = build_net_input(patches, sigma, offsets, res, seed=seed, images_seen=seen, backend="triton")
    given = build_net_input(patches, sigma, offsets, res, noise=noise, backend="triton")
    torch.testing.assert_close(seeded, given, rtol=1e-6, atol=1e-6)
    # Recover the noise the input kernel drew from its output.
    y = (patches.permute(0, 3, 1, 2).double() - 127.5) / 127.5 if uint8 else patches.double()
    sg = sigma.double().reshape(-1, 1, 1, 1)
    recovered = (seeded[:, :c].double() / c_in(sg) - y) / sg
    torch.testing.assert_close(recovered, noise.double(), rtol=0, atol=1e-4)
    # The loss kernel, regenerating noise from (seed, seen), equals the loss on that explicit noise.
    F = torch.randn((b, c, s, s), generator=gen).to(DEV).requires_grad_()
    l_seed = edm_patch_loss(F, patches, sigma, seed=seed, images_seen=seen, backend="triton")
    g_seed, = torch.autograd.grad(l_seed.sum(), F)
    l_noise = edm_patch_loss(F, patches, sigma, noise=noise, backend="triton")
    g_noise, = torch.autograd.grad(l_noise.sum(), F)
    torch.testing.assert_close(l_seed, l_noise, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_seed, g_noise, rtol=1e-6, atol=1e-7 * g_noise.abs().max().item())
    l_other = edm_patch_loss(F, patches, sigma, seed=seed, images_seen=seen + 1, backend="triton")
    assert not torch.allclose(l_other, l_seed), "different images seen must draw different noise"


def test_images_seen_as_tensor_or_int_and_op_or_launcher_agree():
    """Images seen as a device tensor (what a compiled loop passes) draw the same noise as the int; the
    registered ops (what torch.compile calls) equal the direct launches eager mode uses."""
    from pdiff.kernels.edm_loss import edm_loss_op
    from pdiff.kernels.net_input import net_input_op
    gen = fresh_generator()
    b, c, s, res = 3, 3, 8, 16
    patches, sigma, offsets, _ = make_batch(b, c, s, res, True, gen)
    seen = 2**33 + int(torch.randint(0, 2**31, (1,), generator=gen))
    seen_t = torch.tensor(seen, device=DEV)
    assert torch.equal(philox_noise(4, seen, (b, c, s, s), DEV), philox_noise(4, seen_t, (b, c, s, s), DEV))
    assert torch.equal(philox_noise(4, seen, (b, c, s, s), DEV),
                       philox_noise(np.uint64(4), np.int64(seen), (b, c, s, s), DEV))
    by_int = build_net_input(patches, sigma, offsets, res, seed=4, images_seen=seen, backend="triton")
    by_tensor = build_net_input(patches, sigma, offsets, res, seed=4, images_seen=seen_t, backend="triton")
    assert torch.equal(by_int, by_tensor)
    via_op = net_input_op(patches, sigma, offsets, None, None, 4, seen, res, 0.5, torch.float32, False)
    assert torch.equal(via_op, by_int)
    F = torch.randn((b, c, s, s), generator=gen).to(DEV)
    l_int = edm_patch_loss(F, patches, sigma, seed=4, images_seen=seen, backend="triton")
    l_tensor = edm_patch_loss(F, patches, sigma, seed=4, images_seen=seen_t, backend="triton")
    l_op, grad = edm_loss_op(F, patches, sigma, None, seen_t.reshape(1), 4, 0, 0.5, True)
    assert torch.equal(l_int, l_tensor) and torch.equal(l_op, l_int) and not grad.isnan().any()


def test_torch_backend_seeded_noise_is_shared_by_both_ops():
    gen = fresh_generator()
    b, c, s, res = 3, 3, 16, 32
    patches, sigma, offsets, _ = make_batch(b, c, s, res, False, gen, sigma_extremes=False)
    net_in = build_net_input(patches, sigma, offsets, res, seed=3, images_seen=9, backend="torch")
    sg = sigma.double().reshape(-1, 1, 1, 1)
    noise = (net_in[:, :c].double() / c_in(sg) - patches.double()) / sg
    F = torch.randn((b, c, s, s), generator=gen).to(DEV)
    loss = edm_patch_loss(F, patches, sigma, seed=3, images_seen=9, backend="torch")
    torch.testing.assert_close(loss.double(), edm_loss_ref64(F, patches, sigma, noise), rtol=1e-4, atol=0)
    other = build_net_input(patches, sigma, offsets, res, seed=3, images_seen=10, backend="torch")
    assert not torch.allclose(other, net_in)


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(0)
    patches, sigma, offsets, noise = make_batch(3, 3, 8, 16, False, gen)
    with pytest.raises(ValueError, match="exactly one of noise"):
        build_net_input(patches, sigma, offsets, 16, noise=noise, seed=1, images_seen=2, backend="triton")
    with pytest.raises(ValueError, match="exactly one of noise"):
        edm_patch_loss(noise, patches, sigma, backend="triton")
    with pytest.raises(ValueError, match="both seed= and images_seen="):
        build_net_input(patches, sigma, offsets, 16, seed=1, backend="triton")
    with pytest.raises(ValueError, match="offsets must be integer"):
        build_net_input(patches, sigma, offsets.float(), 16, noise=noise, backend="triton")
    with pytest.raises(ValueError, match="F must be float"):
        edm_patch_loss(noise[:, :2], patches, sigma, noise=noise, backend="triton")
    with pytest.raises(ValueError, match="one value per sample"):
        edm_patch_loss(noise, patches, sigma[:2], noise=noise, backend="triton")
    with pytest.raises(ValueError, match="seed must be"):
        build_net_input(patches, sigma, offsets, 16, seed=-1, images_seen=0, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        build_net_input(patches, sigma, offsets, 16, noise=noise, backend="cuda")
    if not CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            os.environ["TRITON_INTERPRET"] = "0"
            try:
                edm_patch_loss(noise, patches, sigma, noise=noise, backend="triton")
            finally:
                os.environ["TRITON_INTERPRET"] = "1"
    else:
        with pytest.raises(ValueError, match="sigma is on cpu"):
            build_net_input(patches, sigma.cpu(), offsets, 16, noise=noise, backend="triton")
    with pytest.raises(TypeError, match="seed must be a Python int"):
        build_net_input(patches, sigma, offsets, 16, seed=torch.tensor(1), images_seen=0, backend="triton")
    with pytest.raises(ValueError, match="images_seen tensor must hold one integer"):
        edm_patch_loss(noise, patches, sigma, seed=1, images_seen=torch.zeros(2, dtype=torch.long), backend="triton")


# --- a training step -------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    """Two convolutions: enough for F to depend on every input channel, coordinates included."""

    def __init__(self, c):
        super().__init__()
        self.a = torch.nn.Conv2d(c + 2, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, c, 3, padding=1)

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))


def train_step(net, patches, sigma, offsets, res, backend, **noise_kw):
    net_in = build_net_input(patches, sigma, offsets, res, backend=backend, **noise_kw)
    F = net(net_in)
    return edm_patch_loss(F, patches, sigma, backend=backend, **noise_kw).mean()


def test_training_step_kernels_match_reference(exact_convs):
    gen = fresh_generator()
    b, c, s, res = 3, 3, 16, 48
    patches, sigma, offsets, noise = make_batch(b, c, s, res, True, gen, sigma_extremes=False)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    net = TinyNet(c).to(DEV)
    grads = {}
    for backend in ("triton", "torch"):
        net.zero_grad()
        loss = train_step(net, patches, sigma, offsets, res, backend, noise=noise)
        loss.backward()
        grads[backend] = (loss.detach(), [p.grad.clone() for p in net.parameters()])
    (l_k, g_k), (l_r, g_r) = grads["triton"], grads["torch"]
    torch.testing.assert_close(l_k, l_r, rtol=1e-5, atol=0)
    for gk, gr in zip(g_k, g_r):
        torch.testing.assert_close(gk, gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item())


def test_compiled_step_has_no_graph_break_and_no_recompile(exact_convs):
    """fullgraph=True turns any graph break into an error; images seen passed as a tensor keep one
    graph across steps. (Without CUDA the compile runs with aot_eager and the kernel ops kept opaque, which is
    how the interpreted kernels can be traced; on CUDA Inductor lowers the Triton kernels.)"""
    import torch._dynamo
    import torch._functorch.config
    gen = fresh_generator()
    b, c, s, res = 3, 3, 8, 24
    patches, sigma, offsets, _ = make_batch(b, c, s, res, True, gen, sigma_extremes=False)
    net = TinyNet(c).to(DEV)
    torch._dynamo.reset()
    for backend in ("triton", "torch"):
        compiled = torch.compile(train_step, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
        # Interpreted kernels cannot be decomposed into the graph; keep the ops opaque there.
        opaque = contextlib.nullcontext() if CUDA else torch._functorch.config.patch(decompose_custom_triton_ops=False)
        with opaque, torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(3):
                seen_t = torch.tensor(step, device=DEV)
                net.zero_grad()
                loss = compiled(net, patches, sigma, offsets, res, backend, seed=5, images_seen=seen_t)
                loss.backward()
                got = [p.grad.clone() for p in net.parameters()]
                net.zero_grad()
                want_loss = train_step(net, patches, sigma, offsets, res, backend, seed=5, images_seen=seen_t)
                want_loss.backward()
                torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
                for g, w in zip(got, [p.grad for p in net.parameters()]):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())
        torch._dynamo.reset()


def test_autocast_bf16_F():
    gen = fresh_generator()
    b, c, s, res = 3, 3, 16, 32
    patches, sigma, offsets, noise = make_batch(b, c, s, res, False, gen, sigma_extremes=False)
    net = TinyNet(c).to(DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        net_in = build_net_input(patches, sigma, offsets, res, noise=noise, out_dtype=torch.bfloat16, backend="triton")
        F = net(net_in)
        assert F.dtype == torch.bfloat16
        loss = edm_patch_loss(F, patches, sigma, noise=noise, backend="triton")
    F.retain_grad()
    loss.mean().backward()
    F64 = F.detach().double().requires_grad_()
    ref = edm_loss_ref64(F64, patches, sigma, noise)
    ref.mean().backward()
    assert_close_to64(loss, ref, torch.float32, "loss from bf16 F")
    torch.testing.assert_close(F.grad.double(), F64.grad, rtol=1e-2, atol=1e-2 * F64.grad.abs().max().item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
