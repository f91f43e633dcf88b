"""Denoiser networks: published parameter counts, shapes at every patch size, gradients reaching every
parameter, input checks, label dropout, and one set of weights serving every patch size."""
from __future__ import annotations

import math

import pytest
import torch

from pdiff.coords import coord_grid
from pdiff.networks import build_network, network_config
from pdiff.networks.layers import Conv2d, CoordFeatures, GroupNorm, UNetBlock

R = 32
ARCHS = ("ddpmpp", "ncsnpp", "adm", "edm2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The networks here are tiny: one thread is as fast, and far faster on a shared, busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count_params(resolution, channels, **cfg) -> int:
    with torch.device("meta"):
        net = build_network(network_config(**cfg), resolution, channels)
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Published architectures (with the two coordinate channels)

@pytest.mark.parametrize("resolution, channels, cfg, expected", [
    (64, 3, dict(arch="ddpmpp"), 61_806_723),
    (64, 3, dict(arch="ncsnpp"), 62_763_395),
    (32, 3, dict(arch="ddpmpp", channel_mult=[2, 2, 2]), 55_735_043),
    # ADM on 32x32x4 latents: EDM's ADM defaults (3 blocks, attention at 32, 16, 8). The published
    # figure is the network WITHOUT a class embedding (label_dim 0) ...
    (32, 4, dict(arch="adm", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                 attn_resolutions=[32, 16, 8]), 279_631_108),
    # ... class conditioning on 1000 classes adds exactly the bias-free 1000 x 768 label embedding.
    (32, 4, dict(arch="adm", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                 attn_resolutions=[32, 16, 8], label_dim=1000), 279_631_108 + 1000 * 768),
])
def test_published_parameter_counts(resolution, channels, cfg, expected):
    assert count_params(resolution, channels, **cfg) == expected


def test_fourier_coordinates_only_widen_the_input_convs():
    base = count_params(64, 3, arch="ddpmpp")
    wide = count_params(64, 3, arch="ddpmpp", coord_embed="fourier", coord_freqs=4)
    assert wide - base == 16 * 128 * 3 * 3  # 4 features per frequency into the 3x3 input conv


# ---------------------------------------------------------------------------------------------
# Tiny networks

def tiny_cfg(arch, label_dim=0, coord_embed="none", **kw):
    base = dict(arch=arch, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[R // 2], dropout=0.0, label_dim=label_dim, coord_embed=coord_embed,
                coord_freqs=3)
    base.update(kw)
    return network_config(**base)


def perturb_(net, scale=0.05):
    """Move every parameter off its init (the "zero" output layers especially), so gradients of
    earlier layers are not legitimately zero."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def make_input(batch, size, channels=3, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(batch, channels, size, size, generator=g)
    offsets = torch.randint(0, R - size + 1, (batch, 2), generator=g)
    coords = coord_grid(offsets, size, R)
    noise = torch.randn(batch, generator=g)
    return torch.cat([x, coords.to(x.dtype)], dim=1), noise


def one_hot(batch, label_dim):
    return torch.nn.functional.one_hot(torch.randint(0, label_dim, (batch,)), label_dim).float()


def first_conv(net):
    return next(iter(net.enc.values()))


@pytest.mark.parametrize("coord_embed", ["none", "fourier"])
@pytest.mark.parametrize("label_dim", [0, 10])
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_gradients_at_every_patch_size(arch, label_dim, coord_embed):
    torch.manual_seed(0)
    net = perturb_(build_network(tiny_cfg(arch, label_dim, coord_embed), R, 3))
    assert net.img_channels == 3 and net.label_dim == label_dim and net.downsample == 2
    assert any(getattr(m, "num_heads", 0) for m in net.modules())   # some block attends
    for size in (R // 4, R // 2, R):
        x, noise = make_input(3, size)
        labels = one_hot(3, label_dim) if label_dim else None
        net.zero_grad(set_to_none=True)
        out = net(x, noise, labels)
        assert out.shape == (3, 3, size, size)
        assert torch.isfinite(out).all()
        (out * torch.randn_like(out)).sum().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{name}: no gradient at patch size {size}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient at patch size {size}"
            assert p.grad.abs().sum() > 0, f"{name}: all-zero gradient at patch size {size}"
        # The coordinate channels reach the network (columns of the first conv that read them).
        assert first_conv(net).weight.grad[:, 3:].abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_output_depends_on_coordinates_noise_level_and_labels(arch):
    torch.manual_seed(1)
    net = perturb_(build_network(tiny_cfg(arch, label_dim=10, coord_embed="fourier"), R, 3)).eval()
    x, noise = make_input(2, 16)
    labels = one_hot(2, 10)
    with torch.no_grad():
        ref = net(x, noise, labels)
        moved = x.clone()
        moved[:, 3:] = coord_grid(torch.tensor([[0, 0], [16, 16]]), 16, R)
        assert not torch.allclose(net(moved, noise, labels), ref, atol=1e-4)
        assert not torch.allclose(net(x, noise + 1, labels), ref, atol=1e-4)
        assert not torch.allclose(net(x, noise, torch.zeros_like(labels)), ref, atol=1e-4)


def test_coordinate_fourier_features():
    feats = CoordFeatures(3)
    x = torch.randn(2, 5, 4, 4)
    out = feats(x)
    assert out.shape == (2, 5 + 12, 4, 4)
    assert torch.equal(out[:, :5], x)
    cx, cy = x[:, 3], x[:, 4]
    k = 2
    f = math.pi * 2**k
    expect = torch.stack([(f * cx).sin(), (f * cx).cos(), (f * cy).sin(), (f * cy).cos()], dim=1)
    torch.testing.assert_close(out[:, 5 + 4 * k: 5 + 4 * (k + 1)], expect)


# ---------------------------------------------------------------------------------------------
# Layer semantics against plain formulas

def test_resampling_filters():
    x = torch.randn(2, 3, 8, 8)
    box_down = Conv2d(3, 3, 0, down=True, resample_filter=[1, 1])
    torch.testing.assert_close(box_down(x), torch.nn.functional.avg_pool2d(x, 2))
    box_up = Conv2d(3, 3, 0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(box_up(x), torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    # [1,3,3,1]: a constant image stays constant away from the zero-padded border, at either rate.
    ones = torch.ones(1, 3, 8, 8)
    torch.testing.assert_close(Conv2d(3, 3, 0, down=True, resample_filter=[1, 3, 3, 1])(ones)[..., 1:-1, 1:-1],
                               torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(Conv2d(3, 3, 0, up=True, resample_filter=[1, 3, 3, 1])(ones)[..., 1:-1, 1:-1],
                               torch.ones(1, 3, 14, 14))
    # Fused conv-then-filter equals the filter applied to the 'full' convolution output.
    fused = Conv2d(3, 4, 3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True, init_bias=1.0)
    full = torch.nn.functional.conv2d(x, fused.weight, fused.bias, padding=2)
    f = fused.resample_filter.expand(4, 1, 4, 4)
    torch.testing.assert_close(fused(x), torch.nn.functional.conv2d(full, f, groups=4, stride=2))


def naive_attention(blk, h):
    """softmax(q^T k / sqrt(d)) v per head, with the qkv channels laid out (head, channel, q/k/v) as
    in EDM (so converted EDM checkpoints keep their meaning), written with plain einsums."""
    b, c, hgt, wid = h.shape
    heads = blk.num_heads
    qkv = blk.qkv(h).reshape(b * heads, c // heads, 3, hgt * wid)
    q, k, v = qkv.unbind(2)
    w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(c // heads), dim=2)
    return blk.proj(torch.einsum("nqk,nck->ncq", w, v).reshape(b, c, hgt, wid))


@pytest.mark.parametrize("adaptive_scale", [False, True])
def test_attention_block_matches_naive_multihead_attention(adaptive_scale):
    torch.manual_seed(6)
    blk = UNetBlock(128, 128, emb_channels=8, attention=True, channels_per_head=64, skip_scale=0.7,
                    adaptive_scale=adaptive_scale, init_zero=dict(init_weight=1.0)).double()
    assert blk.num_heads == 2
    x, emb = torch.randn(2, 128, 4, 4, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        blk.num_heads = 0
        res = blk(x, emb)                       # the residual part alone
        blk.num_heads = 2
        expect = (res + naive_attention(blk, blk.norm2(res))) * 0.7
        torch.testing.assert_close(blk(x, emb), expect)
    # The fused (flash) kernel accepts the layout: q, k, v need a stride-1 channel dim, else SDPA
    # silently drops to its slow fp32 math path (the CPU flash kernel checks the same constraint).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    blk = blk.float()
    h = torch.randn(2, 128, 4, 4)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        torch.testing.assert_close(blk._attend(h), naive_attention(blk, h), rtol=1e-4, atol=1e-5)


def test_group_norm_groups():
    assert GroupNorm(16).num_groups == 4 and GroupNorm(128).num_groups == 32 and GroupNorm(768).num_groups == 32


# ---------------------------------------------------------------------------------------------
# Input checks

@pytest.mark.parametrize("arch", ARCHS)
def test_patch_size_must_be_a_multiple_of_the_downsampling(arch):
    net = build_network(tiny_cfg(arch, channel_mult=[1, 1, 1, 1], attn_resolutions=[]), R, 3)
    assert net.downsample == 8
    x, noise = make_input(1, 16)
    assert net(x, noise).shape == (1, 3, 16, 16)
    x = torch.randn(1, 5, 20, 20)
    with pytest.raises(ValueError, match="patch size 20 is not a multiple of the network's downsampling factor 8"):
        net(x, noise)


def test_bad_channels_labels_and_noise_shapes_are_named():
    net = build_network(tiny_cfg("ddpmpp", label_dim=10), R, 3)
    x, noise = make_input(2, 8)
    with pytest.raises(ValueError, match=r"3 \+ 2"):
        net(x[:, :4], noise)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, noise, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="noise_labels"):
        net(x, noise[:1])
    with pytest.raises(ValueError, match="downsampling factor"):
        build_network(tiny_cfg("adm", channel_mult=[1, 1, 1]), 30, 3)
    with pytest.raises(ValueError, match="network.arch"):
        build_network(tiny_cfg("unet"), R, 3)


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance label dropout

@pytest.mark.parametrize("arch", ARCHS)
def test_label_dropout(arch):
    torch.manual_seed(2)
    net = perturb_(build_network(tiny_cfg(arch, label_dim=10, label_dropout=1.0), R, 3))
    x, noise = make_input(4, 8)
    labels = one_hot(4, 10)
    with torch.no_grad():
        net.eval()
        cond = net(x, noise, labels)
        uncond = net(x, noise, torch.zeros_like(labels))
        assert torch.equal(net(x, noise, None), uncond)  # no labels = the zero vector
        assert not torch.allclose(cond, uncond, atol=1e-4)  # eval mode never drops labels
        net.train()
        torch.testing.assert_close(net(x, noise, labels), uncond)


@pytest.mark.parametrize("arch", ARCHS)
def test_label_dropout_is_per_sample_and_seeded(arch):
    torch.manual_seed(3)
    net = perturb_(build_network(tiny_cfg(arch, label_dim=10, label_dropout=0.5), R, 3))
    batch = 64
    x, noise = make_input(batch, 8)
    labels = one_hot(batch, 10)
    with torch.no_grad():
        net.eval()
        cond, uncond = net(x, noise, labels), net(x, noise, torch.zeros_like(labels))
        net.train()
        torch.manual_seed(7)
        out = net(x, noise, labels)
        torch.manual_seed(7)
        again = net(x, noise, labels)
    assert torch.equal(out, again)
    err_c = (out - cond).flatten(1).abs().amax(1)
    err_u = (out - uncond).flatten(1).abs().amax(1)
    dropped = err_u < 1e-5
    assert torch.all(dropped ^ (err_c < 1e-5)), "each sample is either conditional or unconditional"
    assert 12 <= int(dropped.sum()) <= 52


# ---------------------------------------------------------------------------------------------
# One set of weights for every patch size

@pytest.mark.parametrize("arch", ARCHS)
def test_same_modules_run_at_every_patch_size(arch):
    torch.manual_seed(4)
    net = build_network(tiny_cfg(arch, label_dim=10), R, 3)
    ran = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.setdefault(size, set()).add(n))
             for n, m in net.named_modules() if n]
    for size in (R // 2, R):
        x, noise = make_input(2, size)
        assert net(x, noise, one_hot(2, 10)).shape == (2, 3, size, size)
    for h in hooks:
        h.remove()
    assert ran[R // 2] == ran[R]
    # Attention is placed by level (the 16x16 level of a 32 network), not by the runtime size: the
    # patch-16 pass runs attention at its 8x8 level because that is level 1.
    attending = {n for n, m in net.named_modules() if getattr(m, "num_heads", 0)}
    assert attending and attending <= ran[R // 2]
    assert all(n.split(".")[1].startswith("16x16") for n in attending)


@pytest.mark.parametrize("arch", ARCHS)
def test_traces_as_one_graph(arch):
    """No graph breaks (no data-dependent Python control flow, no .item()); eager backend only."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    net = build_network(tiny_cfg(arch, label_dim=10, label_dropout=0.3, coord_embed="fourier"), R, 3)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x, noise = make_input(2, 16)
    labels = one_hot(2, 10)
    torch.manual_seed(9)
    out = compiled(x, noise, labels)
    torch.manual_seed(9)
    torch.testing.assert_close(out, net(x, noise, labels))


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip(arch):
    """A fresh network given the saved state computes the same function (NCSN++'s random Fourier
    frequencies are a saved buffer, not redrawn)."""
    torch.manual_seed(10)
    net = perturb_(build_network(tiny_cfg(arch, label_dim=10), R, 3)).eval()
    torch.manual_seed(11)
    fresh = build_network(tiny_cfg(arch, label_dim=10), R, 3).eval()
    x, noise = make_input(2, 16)
    labels = one_hot(2, 10)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, noise, labels), net(x, noise, labels), atol=1e-4)
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(fresh(x, noise, labels), net(x, noise, labels))


@pytest.mark.parametrize("arch, keys", [
    ("ddpmpp", ["map_layer0.weight", "enc.32x32_conv.weight", "enc.16x16_down.skip.resample_filter",
                "dec.16x16_in0.qkv.weight", "dec.32x32_block1.conv1.weight", "dec.32x32_aux_conv.weight"]),
    ("ncsnpp", ["map_noise.freqs", "enc.16x16_aux_residual.weight", "dec.32x32_aux_norm.weight"]),
    ("adm", ["map_label.weight", "enc.16x16_block0.norm2.weight", "out_norm.weight", "out_conv.bias"]),
])
def test_state_dict_keys_follow_edm_names(arch, keys):
    """EDM's module names, so weights move between the two code bases without a key map."""
    sd = build_network(tiny_cfg(arch, label_dim=10), R, 3).state_dict()
    assert set(keys) <= set(sd), sorted(set(keys) - set(sd))
