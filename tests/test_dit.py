"""The DiT backbone (pdiff/networks/dit.py): sizes, full-canvas positions of a window's tokens,
a full window is the full-canvas forward, and MaskDiT's token masking."""
from __future__ import annotations

import pytest
import torch

from pdiff.coords import canvas_grid, coord_grid, crop
from pdiff.networks.dit import DIT_SIZES, DiT, sincos_2d, token_positions


def official_dit_parameters(depth, hidden, p, channels, classes, learn_sigma, tokens, mlp_ratio=4):
    """Parameters of facebookresearch/DiT's models.py DiT, counted from its layers: PatchEmbed conv,
    the timestep MLP (256 -> D -> D), the label table with its null row, per block qkv + proj + MLP +
    adaLN (6D), the final layer (adaLN 2D + linear to p*p*out) and the frozen pos_embed Parameter."""
    d, m = hidden, int(hidden * mlp_ratio)
    out = channels * (2 if learn_sigma else 1)
    patch = channels * p * p * d + d
    t_emb = 256 * d + d + d * d + d
    y_emb = (classes + 1) * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (d * 6 * d + 6 * d)
    final = (d * 2 * d + 2 * d) + (d * p * p * out + p * p * out)
    return patch + t_emb + y_emb + depth * block + final + tokens * d


def test_formula_reproduces_the_official_xl2_count():
    # DiT-XL/2 on 32x32x4 latents with 1000 classes: the count facebookresearch/DiT prints.
    assert official_dit_parameters(28, 1152, 2, 4, 1000, learn_sigma=True, tokens=256) == 675_129_632


@pytest.mark.parametrize("size,paper_m", [("S", 33), ("B", 130), ("XL", 675)])
def test_parameter_counts_equal_dits(size, paper_m):
    """pdiff's DiT-{S,B,XL}/2 has DiT's layers less the two things EDM preconditioning changes: the
    output has C channels (no learned sigma), and positions are computed, not a frozen Parameter.
    With those put back the count is the paper's, to its rounding (33M, 130M, 675M)."""
    depth, hidden, heads = DIT_SIZES[size]
    with torch.device("meta"):
        net = DiT(32, 4, label_dim=1000, label_dropout=0.1, depth=depth, hidden=hidden, heads=heads, token_size=2)
    ours = sum(p.numel() for p in net.parameters())
    assert ours == official_dit_parameters(depth, hidden, 2, 4, 1000, learn_sigma=False, tokens=0)
    official = official_dit_parameters(depth, hidden, 2, 4, 1000, learn_sigma=True, tokens=256)
    assert abs(official / 1e6 - paper_m) < 0.6   # the paper's table rounds (B/2: 130.5M -> 130M)


@pytest.mark.parametrize("p", [2, 4])
def test_window_tokens_get_the_full_canvas_positions(p):
    R, s = 32, 16
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    offsets = torch.randint(0, R - s + 1, (5, 2), generator=g)
    offsets[0] = torch.tensor([0, 0])
    offsets[1] = torch.tensor([R - s, R - s])
    for dtype in (torch.float32, torch.bfloat16):
        px, py = token_positions(coord_grid(offsets, s, R, dtype), R, p)
        for i, (x0, y0) in enumerate(offsets.tolist()):
            for a in range(s // p):          # row of tokens
                for b in range(s // p):      # column of tokens
                    # the token's top-left pixel is (x0 + b p, y0 + a p): its position in token units
                    assert px[i, a, b].item() == (x0 + b * p) / p
                    assert py[i, a, b].item() == (y0 + a * p) / p
    # The full canvas: token (a, b) sits at (b, a), DiT's table.
    px, py = token_positions(canvas_grid(1, R, R), R, p)
    n = R // p
    assert torch.equal(px[0], torch.arange(n).float().expand(n, n))
    assert torch.equal(py[0], torch.arange(n).float()[:, None].expand(n, n))


def test_sincos_matches_dits_table():
    """At integer positions the 2-D table is DiT's get_2d_sincos_pos_embed (w first, sin then cos)."""
    import numpy as np
    dim, n = 16, 4
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ref = np.concatenate([np.sin(xs.reshape(-1, 1) * omega), np.cos(xs.reshape(-1, 1) * omega),
                          np.sin(ys.reshape(-1, 1) * omega), np.cos(ys.reshape(-1, 1) * omega)], axis=1)
    ours = sincos_2d(torch.tensor(xs.reshape(-1)), torch.tensor(ys.reshape(-1)), dim)
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float32), atol=1e-6, rtol=0)


def _trained_dit(rope=False, decoder_depth=0, label_dim=3):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    net = DiT(16, 3, label_dim=label_dim, depth=2, hidden=32, heads=2, token_size=2, rope=rope,
              decoder_depth=decoder_depth).eval()
    for prm in net.parameters():   # DiT starts as zero output: give every weight a value
        prm.data.normal_(0, 0.2)
    return net


@pytest.mark.parametrize("rope", [False, True])
def test_full_window_is_the_full_canvas_forward(rope):
    net = _trained_dit(rope)
    R = 16
    x = torch.randn(2, 3, R, R)
    noise = torch.randn(2)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    window = torch.cat([x, coord_grid(torch.zeros(2, 2, dtype=torch.long), R, R)], 1)
    canvas = torch.cat([x, canvas_grid(2, R, R)], 1)
    torch.testing.assert_close(net(window, noise, labels), net(canvas, noise, labels), rtol=0, atol=0)


@pytest.mark.parametrize("rope", [False, True])
def test_window_tokens_are_embedded_at_their_canvas_positions(rope):
    """The embedded tokens of a window equal the full image's embedded tokens at those places (the
    first layer sees exactly what it would see in the full canvas); and the window's output depends
    on its offset (a window is not a small image)."""
    net = _trained_dit(rope)
    R, s, p = 16, 8, 2
    img = torch.randn(1, 3, R, R)
    off = torch.tensor([[4, 6]])
    window = crop(img, off, s)
    pw_x, pw_y = token_positions(coord_grid(off, s, R), R, p)
    pc_x, pc_y = token_positions(canvas_grid(1, R, R), R, p)
    emb = lambda im, px, py: (net.x_embedder(im).flatten(2).transpose(1, 2)  # noqa: E731
                              + sincos_2d(px.reshape(1, -1), py.reshape(1, -1),
                                          net.hidden)).reshape(1, *px.shape[1:], -1)
    full = emb(img, pc_x, pc_y)
    part = emb(window, pw_x, pw_y)
    torch.testing.assert_close(part, full[:, 3:3 + s // p, 2:2 + s // p], rtol=1e-5, atol=1e-5)
    noise = torch.randn(1)
    a = net(torch.cat([window, coord_grid(off, s, R)], 1), noise, None)
    b = net(torch.cat([window, coord_grid(off + 2, s, R)], 1), noise, None)
    assert not torch.allclose(a, b)


def test_dropped_label_uses_the_null_row():
    net = _trained_dit()
    c_none = net.conditioning(torch.zeros(2), torch.zeros(2, 3))
    c_null = net.t_embedder(net.timestep_embedding(torch.zeros(2))) + net.y_embedder[-1]
    torch.testing.assert_close(c_none, c_null)
    c1 = net.conditioning(torch.zeros(1), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(c1, net.t_embedder(net.timestep_embedding(torch.zeros(1))) + net.y_embedder[1])


def test_masked_forward_encodes_only_kept_tokens():
    """With keep given, the encoder blocks run on the kept tokens alone (changing a dropped token's
    pixels does not change the kept tokens' encodings), and the decoder returns a full window."""
    net = _trained_dit(decoder_depth=1, label_dim=0)
    R, s = 16, 8
    off = torch.tensor([[2, 4], [8, 0]])
    x = torch.cat([torch.randn(2, 3, s, s), coord_grid(off, s, R)], 1)
    t = (s // 2) ** 2
    keep = torch.stack([torch.randperm(t)[: t // 2].sort().values for _ in range(2)])
    seen = []
    hook = net.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    noise = torch.randn(2)
    out = net(x, noise, None, keep=keep)
    assert out.shape == (2, 3, s, s) and seen[0].shape == (2, t // 2, net.hidden)
    dropped = sorted(set(range(t)) - set(keep[0].tolist()))[0]
    a, b = divmod(dropped, s // 2)
    x2 = x.clone()
    x2[0, :3, 2 * a:2 * a + 2, 2 * b:2 * b + 2] += 1.0
    net(x2, noise, None, keep=keep)
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    hook.remove()


def test_masked_step_loss_is_on_the_right_tokens():
    """PatchLoss of a masked step: the number of kept tokens is round(T (1 - ratio)); the loss equals
    masked_patch_loss written out over the kept and dropped pixels; the gradient reaches F only
    through those terms (a dropped token's EDM term and a kept token's reconstruction do not count)."""
    from pdiff.loss import token_pixel_mask
    from pdiff.precond import EDMPrecond, c_in, c_out, c_skip, loss_weight
    from pdiff.step import PatchLoss
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    net = DiT(16, 3, depth=1, hidden=32, heads=2, token_size=2, decoder_depth=1, mask_ratio=0.75, mae_weight=0.3)
    for prm in net.parameters():
        prm.data.normal_(0, 0.2)
    loss_mod = PatchLoss(EDMPrecond(net), 16, "torch", torch.float32)
    b, s = 3, 8
    patches = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8)
    offsets = torch.randint(0, 9, (b, 2))
    sigma = torch.rand(b) * 2 + 0.1
    noise = torch.randn(b, 3, s, s)
    torch.manual_seed(7)
    keep = loss_mod.token_keep(b, s, 0)
    assert keep.shape == (b, round(16 * 0.25)) and all(len(set(k.tolist())) == keep.shape[1] for k in keep)
    torch.manual_seed(7)
    got = loss_mod(patches, offsets, sigma, noise, None, 0, 0)
    # Written out: the same keep (same seed), the network's output, and the two means.
    y = (patches.permute(0, 3, 1, 2).float() - 127.5) / 127.5
    x = y + sigma.reshape(-1, 1, 1, 1) * noise
    sg = sigma.reshape(-1, 1, 1, 1)
    net_in = torch.cat([x * c_in(sg), coord_grid(offsets, s, 16)], 1)
    F = net(net_in, sigma.log() / 4, None, keep)
    kept = token_pixel_mask(keep, s // 2, 2)
    assert kept.sum().item() == b * keep.shape[1] * 4
    per = loss_weight(sg) * (c_skip(sg) * x + c_out(sg) * F - y) ** 2
    want = []
    for i in range(b):
        k = kept[i, 0].bool()
        want.append(per[i][:, k].mean() + 0.3 * ((F[i] - c_in(sg[i]) * x[i]) ** 2)[:, ~k].mean())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    # The unmasked phase: no keep, the plain EDM loss.
    net.unmask_after_images = 1000
    assert loss_mod.token_keep(b, s, 1000) is None and loss_mod.phases() == [0, 1000]


# ----------------------------------------------------------------------------------------------
# Training a DiT on the demo's data (scikit-learn's digits at 16x16): windows {4, 8, 16} of 2x2 tokens.

def dit_config(tmp_path, shards, run, network=None, **sections):
    import yaml
    from test_train import write_config
    path = write_config(tmp_path, shards, run=run, **sections)
    cfg = yaml.safe_load(path.read_text())
    cfg["network"] = {"arch": "dit", "depth": 2, "hidden": 32, "heads": 2, "token_size": 2, "label_dim": 0,
                      **(network or {})}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_kill9_resume_of_a_masked_dit_is_bitwise(tmp_path, digits_shards):
    """A class-conditional DiT with MaskDiT masking (and its unmasked phase from 384 images on) is
    killed mid-run and re-run: losses from the checkpoint on, the final weights and the EMA equal an
    uninterrupted run's bit for bit (the kept tokens follow images seen, as every other draw)."""
    from test_train import final_state, kill_at_first_checkpoint, log_rows, run_train
    net = {"label_dim": 10, "label_dropout": 0.3, "mask_ratio": 0.5, "decoder_depth": 1, "unmask_after_images": 384}
    train = {"duration_images": 640}
    run_train(dit_config(tmp_path, digits_shards, "ref", net, train=train))
    cfg = dit_config(tmp_path, digits_shards, "killed", net, train=train)
    killed_at = kill_at_first_checkpoint(cfg, tmp_path / "killed", 640)
    run_train(cfg)
    ref, res = final_state(tmp_path / "ref"), final_state(tmp_path / "killed")
    assert "mask_token" in ref["model"] or any("mask_token" in k for k in ref["model"])
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], res["model"][k]), k
        assert torch.equal(ref["ema"][k], res["ema"][k]), k
    ref_rows = {r["images_seen"]: r["loss"] for r in log_rows(tmp_path / "ref")}
    res_rows = [r for r in log_rows(tmp_path / "killed") if r["images_seen"] > killed_at]
    assert res_rows and all(ref_rows[r["images_seen"]] == r["loss"] for r in res_rows)


def test_compiled_dit_over_two_window_sizes_has_no_recompiles(tmp_path, digits_shards):
    """torch.compile of a DiT trained on windows {8, 16}: each window size compiles once in the
    warm-up and no step compiles again."""
    from test_train import log_rows, run_train
    cfg = dit_config(tmp_path, digits_shards, "run", patch={"sizes": [8, 16], "probs": [0.5, 0.5]},
                     train={"compile": True, "compile_backend": "aot_eager", "duration_images": 128,
                            "log_every_images": 32})    # dynamo's graphs and guards, without inductor's codegen
    run_train(cfg)
    rows = log_rows(tmp_path / "run")
    assert [r["recompiles_after_warmup"] for r in rows] == [0] * len(rows)


def test_window_sizes_must_be_multiples_of_the_token_size(tmp_path, digits_shards, capsys):
    """patch.sizes that the DiT's tokens do not tile are refused before a run starts, naming them."""
    from pdiff import cli
    cfg = dit_config(tmp_path, digits_shards, "run", {"token_size": 4}, patch={"sizes": [6, 16], "probs": [0.5, 0.5]})
    rc = cli.main(["train", "--config", str(cfg), "--dry-run"])
    err = capsys.readouterr().err
    assert rc != 0 and "6" in err and "Traceback" not in err, err


def test_representation_losses_on_dit_tokens():
    """repr on a DiT block: its tokens (B, T, D) are the block's feature map (B, D, n, n), row-major as
    the window's tokens; align's head and the patch embedding before the tap gets gradients; and repr with
    token masking is refused."""
    from pdiff.config import ConfigError, load_config
    from pdiff.repr import feature_map
    from pdiff.step import build_step
    over = ["data.resolution=16", "data.channels=1", "network.depth=2", "network.hidden=32", "network.heads=2",
            "repr.loss=align", "repr.block=blocks.0", "repr.feature_channels=8", "repr.head_channels=16"]
    cfg = load_config("tiny_dit", over)
    step = build_step(cfg, "cpu")
    tokens = torch.randn(3, 16, 5)
    fmap = feature_map(tokens)
    assert fmap.shape == (3, 5, 4, 4) and torch.equal(fmap[1, :, 2, 3], tokens[1, 2 * 4 + 3])
    b, s = 4, 8
    patches = torch.randint(0, 256, (b, s, s, 1), dtype=torch.uint8)
    offsets = torch.randint(0, 9, (b, 2))
    loss, term = step.loss(patches, offsets, torch.rand(b) + 0.1, torch.randn(b, 1, s, s), None, 0, 0,
                           features=torch.randn(b, 8, 4, 4), repr_weight=0.5)
    assert loss.shape == term.shape == (b,) and torch.isfinite(term).all()
    (loss + term).sum().backward()
    head = step.loss.repr_term.head
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert step.model.net.x_embedder.weight.grad.abs().sum() > 0      # (adaLN-Zero: the gates start at 0)
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config("tiny_dit", over + ["network.mask_ratio=0.5"])
