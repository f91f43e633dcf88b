"""The representation losses (pdiff/repr.py, the `repr` section): the dispersive loss against a loop
over pairs; a stored feature grid sampled over a patch against the encoder's grid of the cropped image
(exact where a conv encoder's stride divides the offsets, flips included, through the real pipeline)
and against a direct bilinear computation elsewhere; `pdiff shard --encode-features` (manifest record,
sha256, per-sample member under the CRC-32); a block named wrongly; training with each term, its
switch-off, and a kill -9 resume that stays bitwise with the align head."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pdiff.dataset import open_dataset
from pdiff.pipelines import build_pipeline
from pdiff.pipelines.sample_source import CorruptSample
from pdiff.pipelines.shards import ShardError, verify, write_shards
from pdiff.pipelines.shards.encode_features import load_feature_encoder, weights_sha256
from pdiff.pipelines.shards.reader import ShardSet
from PIL import Image
from test_shard import as_version_3
from test_train import (final_state, kill_at_first_checkpoint, log_rows, run_train,
                        run_two_processes, write_config)

from pdiff.config import ConfigError, load_config
from pdiff.repr import dispersive_loss, feature_region
from pdiff.schedule import PatchSchedule

STRIDE = 4
ENCODER = f'''import torch
def encoder():
    """A random patchify conv (kernel = stride = {STRIDE}) and a 1x1 conv: a crop's grid is the grid's crop."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 6, {STRIDE}, stride={STRIDE}), torch.nn.Tanh(),
                               torch.nn.Conv2d(6, 5, 1))
'''


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("encoder") / "enc.py"
    path.write_text(ENCODER)
    return path


@pytest.fixture(scope="module")
def feature_shards(tmp_path_factory, encoder_file):
    """256 of scikit-learn's digits at 16x16 grey with the random conv's 4x4 feature grids."""
    from PIL import Image
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp("feature_digits")
    d = load_digits()
    imgs = (d.images[:256] / 16.0 * 255).round().astype(np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(i).resize((16, 16), Image.BICUBIC)) for i in imgs])
    np.savez(root / "digits.npz", images=imgs)
    write_shards(root / "digits.npz", root / "shards", max_count=100, workers=1, progress=False,
                 encode_features=f"{encoder_file}:encoder", features_batch=7)
    return root / "shards"


# ----------------------------------------------------------------------------------------------
# The terms

def test_dispersive_loss_matches_a_loop_over_pairs():
    """log (1/B^2) sum_ij exp(-||z_i - z_j||^2 / (d tau)), every pair (i = j too), on random activations."""
    z = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 0.7
    tau = float(torch.rand(()) + 0.2)
    flat = z.reshape(6, -1)
    d = flat.shape[1]
    total = sum(math.exp(-float(((flat[i] - flat[j]) ** 2).sum()) / (d * tau)) for i in range(6) for j in range(6))
    assert float(dispersive_loss(z, tau)) == pytest.approx(math.log(total / 36), rel=1e-5, abs=1e-6)


def test_dispersive_loss_pushes_activations_apart():
    z = torch.randn(8, 16, requires_grad=True)
    dispersive_loss(z, 0.5).backward()
    moved = z.detach() - 0.1 * z.grad
    assert torch.cdist(moved, moved).sum() > torch.cdist(z.detach(), z.detach()).sum()


def _bilinear_roi_align(grid, x0, y0, s, R, n):
    """roi_align(aligned=True, sampling_ratio adaptive) of one box, written out point by point."""
    c, g, _ = grid.shape
    cells = s * g / R                     # the box's side in grid cells
    r = max(1, math.ceil(cells / n))
    out = torch.zeros(c, n, n, dtype=torch.float64)

    def at(v, u):                          # bilinear value at grid coordinates (row v, column u), clamped
        v, u = min(max(v, 0.0), g - 1.0), min(max(u, 0.0), g - 1.0)
        i, j = min(math.floor(v), g - 1), min(math.floor(u), g - 1)
        fi, fj = v - i, u - j
        i1, j1 = min(i + 1, g - 1), min(j + 1, g - 1)
        return ((1 - fi) * (1 - fj) * grid[:, i, j] + (1 - fi) * fj * grid[:, i, j1]
                + fi * (1 - fj) * grid[:, i1, j] + fi * fj * grid[:, i1, j1])
    for a in range(n):
        for b in range(n):
            acc = torch.zeros(c, dtype=torch.float64)
            for p in range(r):
                for q in range(r):
                    v = y0 * g / R - 0.5 + (a + (p + 0.5) / r) * cells / n
                    u = x0 * g / R - 0.5 + (b + (q + 0.5) / r) * cells / n
                    acc += at(v, u)
            out[:, a, b] = acc / (r * r)
    return out


@pytest.mark.parametrize("g,s,R,n", [(7, 8, 32, 3), (16, 16, 32, 4), (5, 16, 16, 5), (9, 12, 24, 2)])
def test_region_off_the_grid_is_bilinear(g, s, R, n):
    """Offsets that fall between cells, output sizes finer and coarser than the grid, the edges."""
    grid = torch.randn(3, 2, g, g, dtype=torch.float64)
    offsets = torch.from_numpy(np.random.default_rng().integers(0, R - s + 1, (3, 2)))
    offsets[0] = torch.tensor([0, R - s])
    got = feature_region(grid, offsets, s, R, n).double()
    for k in range(3):
        want = _bilinear_roi_align(grid[k], int(offsets[k, 0]), int(offsets[k, 1]), s, R, n)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)


def test_region_on_the_grid_is_the_encoder_grid_of_the_crop(encoder_file):
    """A conv whose stride divides the offsets: the region sampled from the whole image's grid is, value
    for value, the grid's crop and the encoder's grid of the cropped image; a flipped patch (offsets in
    the flipped image, grid mirrored as the pipeline mirrors it) gets the mirror of the grid of the crop
    it was read from."""
    enc = load_feature_encoder(f"{encoder_file}:encoder")
    R, s = 32, 16
    image = torch.rand(5, 1, R, R) * 2 - 1
    grid = enc(image)
    offsets = torch.from_numpy(np.random.default_rng().integers(0, (R - s) // STRIDE + 1, (5, 2)) * STRIDE)
    got = feature_region(grid, offsets, s, R, s // STRIDE)
    for k, (x0, y0) in enumerate(offsets.tolist()):
        cells = grid[k, :, y0 // STRIDE:(y0 + s) // STRIDE, x0 // STRIDE:(x0 + s) // STRIDE]
        assert torch.equal(got[k], cells)
        torch.testing.assert_close(got[k], enc(image[k:k + 1, :, y0:y0 + s, x0:x0 + s])[0], rtol=1e-6, atol=1e-6)
    flipped = feature_region(grid.flip(3), offsets, s, R, s // STRIDE)      # offsets now in the mirrored image
    for k, (x0, y0) in enumerate(offsets.tolist()):
        read_x = R - s - x0
        crop = image[k:k + 1, :, y0:y0 + s, read_x:read_x + s]
        torch.testing.assert_close(flipped[k], enc(crop)[0].flip(2), rtol=1e-6, atol=1e-6)


def test_pipeline_features_follow_the_patches_and_their_flips(feature_shards, encoder_file):
    """Through build_pipeline (torch backend, xflip on): each row's region of Batch.features is the
    encoder's grid of the image its patch was read from, at the patch's place, mirrored with it."""
    enc = load_feature_encoder(f"{encoder_file}:encoder")
    cfg = load_config("tiny", [f"data.path={feature_shards}", "data.backend=torch", "data.workers=0",
                               "data.xflip=true", "patch.sizes=[8,16]", "patch.probs=[0.5,0.5]", "train.batch=8",
                               "repr.loss=align", "repr.block=enc.16x16_block0", "data.resolution=16",
                               "data.channels=1", "network.channel_mult=[1,2]"])
    cfg, source, _ = open_dataset(cfg)
    assert cfg.repr.feature_channels == 5
    pipe = build_pipeline(cfg, PatchSchedule.from_config(cfg), source=source)
    flips = checked = 0
    for _ in range(4):
        batch = next(pipe)
        s = batch.patch_size
        on_grid = batch.offsets % STRIDE == 0
        patches = batch.patches.permute(0, 3, 1, 2).float() / 127.5 - 1          # (b, 1, s, s)
        step = pipe.plan.step(batch.images_seen)
        flips += int(step.flips.sum())
        for k in range(len(patches)):
            if not on_grid[k].all():
                continue
            region = feature_region(batch.features[k:k + 1], batch.offsets[k:k + 1], s, 16, s // STRIDE)[0]
            read = patches[k:k + 1].flip(3) if step.flips[k] else patches[k:k + 1]
            want = enc(read)[0].half().float()
            want = want.flip(2) if step.flips[k] else want
            torch.testing.assert_close(region, want, rtol=2e-3, atol=2e-3)
            checked += 1
    pipe.close()
    assert flips > 0 and checked > 0


# ----------------------------------------------------------------------------------------------
# Shards with feature grids

def test_encode_features_round_trip(feature_shards, encoder_file, tmp_path):
    """The manifest records the encoder and the sha256 of its weights; each sample's .feat member is
    the encoder's grid of its image (float16); the member is under the sample's CRC-32 (read and
    verify name a damaged one)."""
    m = json.loads((feature_shards / "manifest.json").read_text())
    enc = load_feature_encoder(f"{encoder_file}:encoder")
    assert m["features"] == {"source": f"{encoder_file}:encoder", "sha256": weights_sha256(enc), "grid": 4,
                             "channels": 5, "dtype": "float16", "layout": "chw", "ext": "feat"}
    src = ShardSet(feature_shards)
    for i in np.random.default_rng().choice(src.count, 6, replace=False):
        img = np.array(Image.open(io.BytesIO(src.read(int(i)))))
        x = torch.from_numpy(img)[None, None].float() / 127.5 - 1
        stored = src.read_features(int(i))
        assert stored.dtype == np.float16 and stored.shape == (5, 4, 4)
        # the writer encoded batches of 7: float32 sums in another order, so within one float16 step
        np.testing.assert_allclose(stored.astype(np.float32), enc(x)[0].detach().numpy(), rtol=1e-3, atol=1e-5)
    # damage one byte of sample 3's feature member in a copy
    copy = tmp_path / "copy"
    shutil.copytree(feature_shards, copy)
    src = ShardSet(copy)
    tar, off = src.tars[int(src.shard[3])], int(src.feat_off[3])
    with open(tar, "r+b") as f:
        f.seek(off + 5)
        byte = f.read(1)
        f.seek(off + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptSample, match="CRC-32"):
        ShardSet(copy).read_features(3)
    with pytest.raises(CorruptSample, match="CRC-32"):
        ShardSet(copy).read(3)
    ok, msg = verify(copy, workers=1, progress=False)
    assert not ok and "000000003" in msg and "CRC-32" in msg


def test_encode_features_refuses_what_it_cannot_load(tmp_path, random_shards):
    from pdiff.pipelines.shards.inputs import ShardInputError
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ShardInputError, match="FILE.py:FACTORY"):
        write_shards(tmp_path / "a.npz", tmp_path / "out", workers=1, progress=False, encode_features="nonsense")
    (tmp_path / "e.py").write_text("def make():\n    return 3\n")
    with pytest.raises(ShardInputError, match="not a torch module"):
        write_shards(tmp_path / "a.npz", tmp_path / "out", workers=1, progress=False,
                     encode_features=f"{tmp_path / 'e.py'}:make")


def test_align_without_stored_features_is_refused(random_shards):
    from pdiff.pipelines import SourceError
    cfg = load_config("tiny", [f"data.path={random_shards}", "repr.loss=align", "repr.block=enc.16x16_block0",
                               "network.channel_mult=[1,2]", "data.resolution=16"])
    with pytest.raises(SourceError, match="--encode-features"):
        open_dataset(cfg)


def test_a_block_that_is_not_in_the_network_is_named_with_close_ones():
    with pytest.raises(ConfigError, match=r"repr.block.*did you mean enc.32x32_block0"):
        load_config("tiny", ["repr.loss=dispersive", "repr.block=enc.32x32_blok0"])
    load_config("tiny", ["repr.loss=dispersive", "repr.block=dec.16x16_block1"])


# ----------------------------------------------------------------------------------------------
# Training

REPR_NET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
            "label_dim": 0}


@pytest.mark.parametrize("loss", ["dispersive", "align"])
def test_training_with_each_term_and_its_switch_off(tmp_path, feature_shards, loss):
    """A few CPU steps with the term on until repr.until_images, then off; the align head trains
    (changes), is saved in the checkpoint, not in the EMA snapshot."""
    until = 96
    cfg = write_config(tmp_path, feature_shards, network=REPR_NET, train={"duration_images": 192},
                       repr={"loss": loss, "block": "enc.8x8_block0", "head_channels": 16, "until_images": until})
    run_train(cfg)
    rows = log_rows(tmp_path / "run")
    on = [r["repr/weighted_term"] for r in rows if r["images_seen"] <= until]
    off = [r["repr/weighted_term"] for r in rows if r["images_seen"] - 32 >= until]
    assert on and all(v != 0 and math.isfinite(v) for v in on)
    assert off and all(v == 0 for v in off)
    state = final_state(tmp_path / "run")
    if loss == "align":
        assert all(v < 0 for v in on)          # weight x minus a cosine similarity: a trained head aligns
        head = state["repr_head"]
        assert any(k.startswith("head.") for k in head)
    else:
        assert "repr_head" not in state
    from safetensors.torch import load_file
    snap = load_file(str(next((tmp_path / "run" / "snapshots").glob("*.safetensors"))))
    assert not any("head" in k for k in snap)


def test_align_with_two_processes_matches_one_process(tmp_path, feature_shards):
    """torchrun with 2 gloo processes: DDP reduces the head's gradients with the model's, before and
    after the switch-off (the head runs at weight 0 then, so every parameter still has a gradient), and
    the run ends where one process with the same global batch ends (align is a per-sample term)."""
    common = dict(network=REPR_NET, train={"duration_images": 160, "ckpt_every_images": 160}, data={"xflip": True},
                  repr={"loss": "align", "block": "enc.8x8_block0", "head_channels": 16, "until_images": 96})
    one = write_config(tmp_path, feature_shards, run="one", **common)
    two = write_config(tmp_path, feature_shards, run="two", **common)
    run_train(one)
    run_two_processes(two)
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert b["world_size"] == 2 and a["images_seen"] == b["images_seen"] >= 160
    for part in ("model", "repr_head"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-5, msg=k)


def test_kill9_resume_with_align_is_bitwise(tmp_path, feature_shards):
    """kill -9 after the first checkpoint, run again: model, EMA, the align head and the optimizer
    equal an uninterrupted run's bit for bit, and the logged terms after the checkpoint match."""
    rcfg = {"loss": "align", "block": "enc.8x8_block0", "head_channels": 16, "until_images": 480}
    long = {"duration_images": 640}
    ref = write_config(tmp_path, feature_shards, run="ref", network=REPR_NET, train=long, repr=rcfg)
    run_train(ref)
    cfg = write_config(tmp_path, feature_shards, run="killed", network=REPR_NET, train=long, repr=rcfg)
    killed_at = kill_at_first_checkpoint(cfg, tmp_path / "killed", 640)
    run_train(cfg)
    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "killed")
    for part in ("model", "ema", "repr_head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    ref_rows = {r["images_seen"]: r for r in log_rows(tmp_path / "ref")}
    rows = [r for r in log_rows(tmp_path / "killed") if r["images_seen"] > killed_at]
    assert rows and all(ref_rows[r["images_seen"]]["loss"] == r["loss"] for r in rows)
    assert all(ref_rows[r["images_seen"]].get("repr/weighted_term") == r.get("repr/weighted_term") for r in rows)


def test_info_lists_the_block_names(capsys):
    from pdiff.tools.info import main
    assert main(["tiny", "--blocks"]) == 0
    names = capsys.readouterr().out.split()
    assert "enc.32x32_block0" in names and "dec.8x8_in0" in names and "" not in names


def test_the_block_tap_compiles_into_the_networks_graph():
    """The hook runs inside the compiled network: one graph, no break, and the tapped output is the
    block's output of an eager run."""
    from pdiff.model import build_model
    from pdiff.networks import find_block
    from pdiff.repr import BlockTap, TappedNetwork
    cfg = load_config("tiny", ["network.model_channels=8", "network.channel_mult=[1,2]", "data.resolution=16",
                               "data.channels=1"])
    net = build_model(cfg).net
    tapped = TappedNetwork(net, BlockTap(find_block(net, "enc.8x8_block0")))
    x, c = torch.randn(3, 3, 8, 8), torch.randn(3)
    explained = torch._dynamo.explain(tapped)(x, c, None)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    kept = []
    hook = find_block(net, "enc.8x8_block0").register_forward_hook(lambda m, a, out: kept.append(out))
    out, block = tapped(x, c, None)
    hook.remove()
    assert torch.equal(block, kept[-1]) and torch.equal(out, net(x, c, None))


def test_a_flipped_feature_byte_in_a_version_4_shard_is_named(feature_shards, tmp_path):
    """Format version 4: the .feat member has its own CRC-32 and place in the sample's CRC record. A
    flipped byte of one sample's grid (fresh sample, byte and bit) is named as that member by
    read_features, by a whole read, by `pdiff shard verify` and by the pipeline's feature path
    (data.on_corrupt=stop); every other sample's grid reads as stored, and with skip the run goes on."""
    rng = np.random.default_rng()
    copy = tmp_path / "copy"
    shutil.copytree(feature_shards, copy)
    clean = ShardSet(feature_shards)
    assert clean.version == 4 and clean.crc_files and sorted(copy.glob("*.crc"))
    i = int(rng.integers(clean.count))
    off = int(clean.feat_off[i]) + int(rng.integers(int(clean.feat_size[i])))
    bit = 1 << int(rng.integers(8))

    def flip(folder: Path) -> None:
        with open(clean.tars[int(clean.shard[i])].replace(str(feature_shards), str(folder)), "r+b") as f:
            f.seek(off)
            byte = f.read(1)[0]
            f.seek(off)
            f.write(bytes([byte ^ bit]))

    flip(copy)
    key = f"{i:09d}"
    named = rf"sample {key} .*its \.feat features \(at byte {int(clean.feat_off[i])}\) fails its CRC-32 check"
    damaged = ShardSet(copy)
    with pytest.raises(CorruptSample, match=named):
        damaged.read_features(i)
    with pytest.raises(CorruptSample, match=named):
        damaged.read(i)
    for j in rng.choice(np.delete(np.arange(clean.count), i), 8, replace=False):
        np.testing.assert_array_equal(damaged.read_features(int(j)), clean.read_features(int(j)))
        assert damaged.read(int(j)) == clean.read(int(j))
    ok, msg = verify(copy, workers=1, progress=False)
    assert not ok and key in msg and ".feat features fails its CRC-32 check" in msg

    def steps(on_corrupt: str) -> int:
        cfg = load_config("tiny", [f"data.path={copy}", "data.backend=torch", "data.workers=0",
                                   f"data.on_corrupt={on_corrupt}", "patch.sizes=[16]", "patch.probs=[1]",
                                   "train.batch=32",
                                   "repr.loss=align", "repr.block=enc.16x16_block0", "data.resolution=16",
                                   "data.channels=1", "network.channel_mult=[1,2]"])
        cfg, source, _ = open_dataset(cfg)
        pipe = build_pipeline(cfg, PatchSchedule.from_config(cfg), source=source)
        try:
            for _ in range(2 * clean.count // 32):
                batch = next(pipe)
                assert batch.features.shape[1:] == (5, 4, 4) and torch.isfinite(batch.features).all()
        finally:
            pipe.close()
        return len(pipe.corrupt.found)

    with pytest.raises((ShardError, CorruptSample), match=named):
        steps("stop")
    assert steps("skip") >= 1
    # the same damage in a version 3 copy: the sample's one CRC-32 spans its .feat member
    v3 = tmp_path / "v3"
    shutil.copytree(feature_shards, v3)
    as_version_3(v3)
    flip(v3)
    old = ShardSet(v3)
    assert old.version == 3 and not sorted(v3.glob("*.crc"))
    for read in (old.read_features, old.read):
        with pytest.raises(CorruptSample, match=rf"sample {key} .*fails its CRC-32 check"):
            read(i)
    j = int(rng.choice(np.delete(np.arange(clean.count), i)))
    np.testing.assert_array_equal(old.read_features(j), clean.read_features(j))
