"""The compiled Triton kernels on a GPU at the paper's training shapes (run by benchmarks/gpu_suite.sh).

tests/test_kernels.py runs its whole suite on CUDA too when a GPU is present; this file adds what
only a GPU can check: the shapes training uses (several programs per sample), Inductor compiling a
step that calls the kernels, the noise at scale, and the memory the fused loss saves.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.kernels,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device for compiled Triton kernels")]

if torch.cuda.is_available():
    from pdiff.kernels import _common, build_net_input, edm_patch_loss, philox_noise
    from pdiff.kernels.edm_loss import edm_loss_ref, edm_loss_ref64
    from pdiff.kernels.net_input import net_input_ref64

DEV = "cuda"
# (batch, channels, patch size, canvas): 64x64 pixels at each patch size with its batch multiplier,
# and 32x32x4 latents at both patch sizes.
TRAINING_SHAPES = [(256, 3, 16, 64), (128, 3, 32, 64), (64, 3, 64, 64), (128, 4, 16, 32), (64, 4, 32, 32)]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def batch(b, c, s, res, uint8, gen):
    if uint8:
        patches = torch.randint(0, 256, (b, s, s, c), generator=gen, device=DEV, dtype=torch.uint8)
    else:
        patches = torch.rand((b, c, s, s), generator=gen, device=DEV) * 2 - 1
    sigma = (torch.randn(b, generator=gen, device=DEV) * 1.2 - 1.2).exp()
    sigma[0], sigma[-1] = 0.002, 80.0
    offsets = torch.randint(0, res - s + 1, (b, 2), generator=gen, device=DEV)
    offsets[0], offsets[-1] = 0, res - s
    return patches, sigma, offsets


@pytest.mark.parametrize("b,c,s,res", TRAINING_SHAPES)
def test_training_shapes_match_float64(b, c, s, res):
    gen = torch.Generator(DEV).manual_seed(torch.seed() % 2**31)
    for uint8, seeded, out_dtype, cl in ((True, True, torch.bfloat16, True), (False, False, torch.float32, False)):
        patches, sigma, offsets = batch(b, c, s, res, uint8, gen)
        noise = (philox_noise(9, 123456789, (b, c, s, s), DEV) if seeded
                 else torch.randn((b, c, s, s), generator=gen, device=DEV))
        kw = dict(seed=9, images_seen=123456789) if seeded else dict(noise=noise)
        out = build_net_input(patches, sigma, offsets, res, out_dtype=out_dtype, channels_last=cl, backend="triton",
                              **kw)
        ref = net_input_ref64(patches, sigma, offsets, res, noise)
        assert not out.isnan().any()
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 0.1)
        f_dtype = out_dtype
        F = torch.randn((b, c, s, s), generator=gen, device=DEV).to(f_dtype)
        if cl:
            F = F.contiguous(memory_format=torch.channels_last)
        F.requires_grad_()
        loss = edm_patch_loss(F, patches, sigma, backend="triton", **kw)
        loss.mean().backward()
        F64 = F.detach().double().requires_grad_()
        ref_loss = edm_loss_ref64(F64, patches, sigma, noise)
        ref_loss.mean().backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
        assert not F.grad.isnan().any()
        torch.testing.assert_close(F.grad.double(), F64.grad, rtol=tol, atol=tol * F64.grad.abs().max().item())


@pytest.mark.parametrize("b,c,s,res", TRAINING_SHAPES[:3])
def test_uint8_patches_match_the_float_path_to_one_ulp(b, c, s, res):
    """uint8 to the device on the compiled kernels: the network input and the loss from uint8 HWC
    patches against the float32 CHW patches the pipelines delivered before. The network input need
    not be bit for bit here: the compiler may fuse the normalizing product (v - 127.5) * (1 / 127.5)
    with the add of sigma n into one FMA in the uint8 variant (y is then not rounded on its own),
    where the float variant loads y already rounded. The difference is that rounding, at most half an
    ulp of |y| <= 1, times c_in <= 2, so 2^-23 absolute, plus one rounding of the result (2^-23
    relative); 2^-22 of each allows for both. (On the CPU, with no contraction, tests/test_kernels.py
    asserts bit identity.)"""
    import numpy as np
    gen = torch.Generator(DEV).manual_seed(torch.seed() % 2**31)
    patches, sigma, offsets = batch(b, c, s, res, True, gen)
    lut = torch.from_numpy((np.arange(256, dtype=np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)).to(DEV)
    before = lut[patches.long()].permute(0, 3, 1, 2).contiguous()
    kw = dict(seed=5, images_seen=987654321)
    a = build_net_input(patches, sigma, offsets, res, backend="triton", **kw)
    want = build_net_input(before, sigma, offsets, res, backend="triton", **kw)
    torch.testing.assert_close(a, want, rtol=2.0 ** -22, atol=2.0 ** -22)
    F = torch.randn((b, c, s, s), generator=gen, device=DEV)
    la = edm_patch_loss(F, patches, sigma, backend="triton", **kw)
    lw = edm_patch_loss(F, before, sigma, backend="triton", **kw)
    torch.testing.assert_close(la, lw, rtol=1e-6, atol=0)


def test_noise_statistics_at_scale():
    draws = philox_noise(2024, 77, (512, 3, 64, 64), DEV).double()
    n = draws.numel()
    assert abs(draws.mean().item()) < 6 / n**0.5
    assert abs(draws.var().item() - 1) < 6 * (2 / n) ** 0.5
    # Fourth moment of a standard normal is 3.
    assert abs((draws**4).mean().item() - 3) < 6 * (96 / n) ** 0.5
    other = philox_noise(2024, 78, (512, 3, 64, 64), DEV).double()
    corr = ((draws - draws.mean()) * (other - other.mean())).mean() / (draws.std() * other.std())
    assert abs(corr.item()) < 6 / n**0.5


def test_inductor_step_matches_eager():
    """A full step (kernels -> conv net -> loss -> backward) compiled by Inductor, fullgraph."""
    gen = torch.Generator(DEV).manual_seed(torch.seed() % 2**31)
    b, c, s, res = 64, 3, 32, 64
    patches, sigma, offsets = batch(b, c, s, res, True, gen)
    net = torch.nn.Sequential(torch.nn.Conv2d(c + 2, 32, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(32, c, 3, padding=1)).to(DEV)

    def step(patches, sigma, offsets, seen_t):
        net_in = build_net_input(patches, sigma, offsets, res, seed=1, images_seen=seen_t, out_dtype=torch.bfloat16,
                                 backend="triton")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            F = net(net_in)
        return edm_patch_loss(F, patches, sigma, seed=1, images_seen=seen_t, backend="triton").mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):
            seen_t = torch.tensor(i, device=DEV)
            net.zero_grad()
            loss = compiled(patches, sigma, offsets, seen_t)
            loss.backward()
            got = [p.grad.clone() for p in net.parameters()]
            net.zero_grad()
            want = step(patches, sigma, offsets, seen_t)
            want.backward()
            torch.testing.assert_close(loss, want, rtol=2e-3, atol=0)
            for g, w in zip(got, [p.grad for p in net.parameters()]):
                torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_fused_loss_uses_less_memory_than_reference():
    gen = torch.Generator(DEV).manual_seed(0)
    b, c, s, res = 512, 3, 64, 64
    patches, sigma, _ = batch(b, c, s, res, True, gen)
    noise = torch.randn((b, c, s, s), generator=gen, device=DEV)
    F = torch.randn((b, c, s, s), generator=gen, device=DEV, requires_grad=True)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(F, patches, sigma, noise).mean().backward()
        torch.cuda.synchronize()
        F.grad = None
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda *a: edm_patch_loss(*a[:3], noise=a[3], backend="triton"))
    ref = peak(lambda *a: edm_loss_ref(*a))
    tensor_bytes = F.numel() * 4
    # Fused: the saved gradient and the returned one, about 2 tensors; the reference keeps several.
    assert fused <= 2.1 * tensor_bytes, (fused, tensor_bytes)
    assert fused < ref, (fused, ref)
