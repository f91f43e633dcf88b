"""`pdiff sample`: seed-addressed images, outputs, options, torchrun."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pdiff.config import SamplerConfig, load_config
from pdiff.generate import SampleOptions, generate, iter_uint8, parse_seeds
from pdiff.model import build_model
from pdiff.snapshot import save_snapshot
from pdiff.cli import main as pdiff_cli

REPO = Path(__file__).resolve().parents[1]
SMALL = ["network.model_channels=16", "network.channel_mult=[1,2]", "network.attn_resolutions=[]",
         "data.resolution=16", "sample.steps=3"]


def small_model(label_dim=0):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = load_config("tiny", SMALL + [f"network.label_dim={label_dim}"])
    model = build_model(cfg)
    with torch.no_grad():  # random values everywhere, so images depend on every input
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    model, cfg = small_model(label_dim=4)
    return save_snapshot(tmp_path_factory.mktemp("snap") / "snap.safetensors", model, cfg, 777), model, cfg


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("7, 2-3,10") == [7, 2, 3, 10]
    for bad in ("", "5-2", "a-b", "1;2"):
        with pytest.raises(ValueError, match="seed"):
            parse_seeds(bad)


@pytest.mark.parametrize("churn", [0.0, 30.0])
def test_seed_image_independent_of_batch(churn):
    """The image (and label) of a seed is the same in any batch, alone or with others."""
    torch.set_num_threads(1)
    model, cfg = small_model(label_dim=3)
    opts = SampleOptions(SamplerConfig(steps=3, s_churn=churn, s_min=0.01, s_max=50.0))
    seeds = [int(s) for s in torch.randint(0, 2**40, (5,))]
    runs = {}
    for b in (1, 2, 5):
        imgs, labs = [], []
        for chunk in [seeds[i:i + b] for i in range(0, 5, b)]:
            x, lab = generate(model, chunk, 16, 3, 3, opts)
            imgs.append(x)
            labs.append(lab)
        runs[b] = torch.cat(imgs), torch.cat(labs)
    for b in (2, 5):
        torch.testing.assert_close(runs[b][0], runs[1][0], atol=2e-5, rtol=1e-5)
        assert torch.equal(runs[b][1], runs[1][1])
    x = runs[1][0]
    assert all((x[i] - x[j]).abs().mean() > 1e-3 for i in range(5) for j in range(i))  # seeds differ
    # reordering the seeds reorders the images
    again, _ = generate(model, seeds[::-1], 16, 3, 3, opts)
    torch.testing.assert_close(again, x.flip(0), atol=2e-5, rtol=1e-5)


def test_class_and_canvas_options():
    model, cfg = small_model(label_dim=5)
    opts = SampleOptions(SamplerConfig(steps=2), class_label=3, canvas=24)
    x, labels = generate(model, [0, 1, 2], 16, 3, 5, opts)
    assert x.shape == (3, 3, 24, 24) and labels.tolist() == [3, 3, 3]
    _, random_labels = generate(model, list(range(40)), 16, 3, 5, SampleOptions(SamplerConfig(steps=1)))
    assert len(set(random_labels.tolist())) > 1 and random_labels.max() < 5
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [0], 16, 3, 5, SampleOptions(SamplerConfig(steps=1), class_label=5))
    uncond, _ = small_model(label_dim=0)
    with pytest.raises(ValueError, match="unconditional"):
        generate(uncond, [0], 16, 3, 0, SampleOptions(SamplerConfig(steps=1), class_label=1))


def run_cli(args):
    """`pdiff sample ARGS` through the CLI's dispatch (which reports user errors as messages)."""
    return pdiff_cli(["sample", *[str(a) for a in args], "--no-progress", "--device", "cpu"])


def test_cli_outputs_agree_across_batch_sizes(snapshot, tmp_path, capsys):
    torch.set_num_threads(1)
    path, model, cfg = snapshot
    out = tmp_path / "a"
    assert run_cli(["--snapshot", path, "--seeds", "998-1002", "--batch", 2, "--outdir", out / "png",
                    "--subdirs", "--npz", out / "s.npz", "--grid", out / "grid.png", "--grid-count", 4]) == 0
    assert "5 images" in capsys.readouterr().out
    pngs = sorted((out / "png").rglob("*.png"))
    assert [p.relative_to(out / "png").as_posix() for p in pngs] == [
        "000000/000998.png", "000000/000999.png", "001000/001000.png", "001000/001001.png", "001000/001002.png"]
    z = np.load(out / "s.npz")
    assert z["images"].shape == (5, 16, 16, 3) and z["images"].dtype == np.uint8
    assert z["seeds"].tolist() == [998, 999, 1000, 1001, 1002]
    assert ((z["labels"] >= 0) & (z["labels"] < 4)).all()
    for p, img in zip(pngs, z["images"]):
        assert np.array_equal(np.asarray(Image.open(p)), img)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (32, 32, 3) and np.array_equal(grid[16:, :16], z["images"][2])
    # the library's images, in one batch
    _, ref, labels = next(iter_uint8(model, [998, 999, 1000, 1001, 1002], 5, 16, 3, 4,
                                     SampleOptions(cfg.sample), "cpu"))
    assert np.abs(ref.permute(0, 2, 3, 1).numpy().astype(int) - z["images"].astype(int)).max() <= 1
    assert labels.tolist() == z["labels"].tolist()
    # batch 5, fixed class, more steps and churn: a different command, same seed addressing
    assert run_cli(["--snapshot", path, "--seeds", "998-1002", "--batch", 5, "--npz", tmp_path / "b.npz"]) == 0
    zb = np.load(tmp_path / "b.npz")
    assert np.abs(zb["images"].astype(int) - z["images"].astype(int)).max() <= 1
    assert run_cli(["--snapshot", path, "--seeds", "0-1", "--class", 2, "--steps", 4, "--churn", 10,
                    "--canvas", 24, "--npz", tmp_path / "c.npz"]) == 0
    zc = np.load(tmp_path / "c.npz")
    assert zc["images"].shape == (2, 24, 24, 3) and zc["labels"].tolist() == [2, 2]


def test_cli_checkpoint_and_errors(snapshot, tmp_path, capsys):
    from pdiff.config import to_dict
    path, model, cfg = snapshot
    ck = tmp_path / "run" / "checkpoints" / "ckpt-000000001000"
    ck.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": to_dict(cfg),
                "images_seen": 1000}, ck / "state.pt")
    (ck / "COMPLETE").write_text("")
    assert run_cli(["--checkpoint", tmp_path / "run", "--seeds", "3", "--npz", tmp_path / "ck.npz"]) == 0
    assert run_cli(["--snapshot", path, "--seeds", "3", "--npz", tmp_path / "sn.npz"]) == 0
    assert np.array_equal(np.load(tmp_path / "ck.npz")["images"], np.load(tmp_path / "sn.npz")["images"])
    capsys.readouterr()
    assert run_cli(["--snapshot", tmp_path / "nope.safetensors", "--seeds", "0", "--npz", tmp_path / "x.npz"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["--snapshot", path, "--seeds", "0"])  # no output asked for
    assert run_cli(["--snapshot", path, "--seeds", "0", "--canvas", 8, "--npz", tmp_path / "x.npz"]) == 1
    assert "smaller than the training resolution" in capsys.readouterr().err


def test_torchrun_two_processes_match_one(snapshot, tmp_path):
    """Two gloo ranks split the seeds and write the same images as one process."""
    path, _, _ = snapshot
    common = ["sample", "--snapshot", str(path), "--seeds", "0-4", "--batch", "2", "--device", "cpu",
              "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pdiff.cli"] + common + ["--npz", str(tmp_path / "two.npz"), "--outdir", str(tmp_path / "png2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_cli(common[1:] + ["--npz", tmp_path / "one.npz"]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert two["seeds"].tolist() == [0, 1, 2, 3, 4]
    assert np.abs(one["images"].astype(int) - two["images"].astype(int)).max() <= 1
    assert sorted(p.name for p in (tmp_path / "png2").iterdir()) == [f"{s:06d}.png" for s in range(5)]
    assert not list(tmp_path.glob(".two.npz.rank*"))  # partial files cleaned up


def test_latent_models_write_npz_only(tmp_path, capsys):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = load_config("tiny", SMALL + ["data.channels=4"])
    path = save_snapshot(tmp_path / "latent.safetensors", build_model(cfg), cfg, 1)
    assert run_cli(["--snapshot", path, "--seeds", "0-1", "--outdir", tmp_path / "png"]) == 2
    assert "--npz" in capsys.readouterr().err and not (tmp_path / "png").exists()
    assert run_cli(["--snapshot", path, "--seeds", "0-1", "--npz", tmp_path / "lat.npz"]) == 0
    lat = np.load(tmp_path / "lat.npz")["latents"]
    assert lat.shape == (2, 16, 16, 4) and lat.dtype == np.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_seed_image_independent_of_batch(tmp_path):
    model, cfg = small_model(label_dim=3)
    model = model.cuda()
    opts = SampleOptions(SamplerConfig(steps=4, s_churn=20.0, s_min=0.01, s_max=50.0))
    seeds = [int(s) for s in torch.randint(0, 2**40, (6,))]
    whole, labels = generate(model, seeds, 16, 3, 3, opts, "cuda")
    parts = [generate(model, seeds[i:i + b], 16, 3, 3, opts, "cuda") for b, i in ((1, 0), (3, 1), (2, 4))]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole, atol=1e-3, rtol=1e-3)
    assert torch.equal(torch.cat([p[1] for p in parts]), labels)
