"""Latent shards end to end: `pdiff shard --format latent` stores float16/float32 latents exactly (NHWC
or NCHW input), reports bad ones, verify and info read them; both pipeline backends return the stored
values at the plan's offsets; the trainer runs on them. Fresh random latents in every test."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pdiff.config import load_config
from pdiff.schedule import StochasticSchedule
from pdiff.pipelines import build_pipeline, dali_available
from pdiff.pipelines.order import SamplePlan
from pdiff.pipelines.shards import ShardInputError, ShardSet, info, verify, write_shards
from pdiff.cli import main as pdiff_cli
from pdiff.pipelines.shards.format import FORMAT_VERSION
from pdiff.pipelines.shards.options import write_order
from pdiff.tools.shard import main as shard_main

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="NVIDIA DALI is not installed"))]
R, C = 16, 4


def rand_latents(rng, n, size=R, channels=C, dtype=np.float32):
    # spread over several binades, negative values included, like VAE latents times 0.18215
    return (rng.standard_normal((n, size, size, channels)) * rng.choice([0.01, 0.2, 3.0], (n, 1, 1, 1))).astype(dtype)


def stored(root) -> tuple[np.ndarray, np.ndarray]:
    sh = ShardSet(root)
    return np.stack([sh.decode(i) for i in range(sh.count)]), sh.labels


@pytest.fixture
def rng():
    return np.random.default_rng()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_roundtrip_exact_in_the_stored_dtype(tmp_path, rng, dtype, layout):
    lat = rand_latents(rng, 11)
    labels = rng.integers(0, 7, 11)
    arr = lat if layout == "nhwc" else lat.transpose(0, 3, 1, 2).copy()
    np.savez(tmp_path / "lat.npz", latents=arr, labels=labels)
    scale = float(rng.uniform(0.1, 1.0))
    m = write_shards(tmp_path / "lat.npz", tmp_path / "out", encoding="latent", dtype=dtype, layout=layout,
                     latent_scale=scale, images_key="latents", max_count=4, workers=1, progress=False)
    assert m["encoding"] == "latent" and m["dtype"] == dtype and m["shape"] == [R, R, C]
    assert m["channels"] == C and m["resolution"] == R and m["scale"] == scale and m["layout"] == "hwc"
    assert m["count"] == 11 and [r["count"] for r in m["shards"]] == [4, 4, 3]
    assert m["labeled"] and m["skipped"]["count"] == 0
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["dtype"] == dtype and on_disk["scale"] == scale
    got, got_labels = stored(tmp_path / "out")
    assert got.dtype == np.dtype(dtype)
    lat, labels = lat[write_order(11, 0)], labels[write_order(11, 0)]     # written in a seeded random order
    np.testing.assert_array_equal(got, lat.astype(dtype))          # bit-exact within the stored dtype
    np.testing.assert_array_equal(got_labels, labels)
    if dtype == "float32":
        assert got.tobytes() == lat.tobytes()
    ok, msg = verify(tmp_path / "out")
    assert ok, msg
    text = info(tmp_path / "out")
    assert "latent" in text and dtype in text and f"{R}x{R}x{C}" in text


def test_cli_npy_with_labels_file_and_more_channels(tmp_path, rng, capsys):
    lat = rand_latents(rng, 6, size=8, channels=6, dtype=np.float16)
    np.save(tmp_path / "lat.npy", lat.transpose(0, 3, 1, 2))
    np.save(tmp_path / "lab.npy", rng.integers(0, 3, 6))
    assert shard_main([str(tmp_path / "lat.npy"), str(tmp_path / "out"), "--format", "latent", "--layout", "nchw",
                       "--labels", str(tmp_path / "lab.npy"), "--latent-scale", "0.18215", "--workers", "1",
                       "--quiet"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["dtype"] == "float16" and m["channels"] == 6 and m["scale"] == 0.18215 and m["input_layout"] == "nchw"
    got, _ = stored(tmp_path / "out")
    np.testing.assert_array_equal(got, lat[write_order(6, 0)])
    assert shard_main(["verify", str(tmp_path / "out")]) == 0
    assert shard_main(["info", str(tmp_path / "out")]) == 0
    assert "scale 0.18215" in capsys.readouterr().out


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_sample_is_reported_with_its_index(tmp_path, rng, bad_value):
    lat = rand_latents(rng, 9)
    k = int(rng.integers(0, 9))
    lat[k, int(rng.integers(R)), int(rng.integers(R)), int(rng.integers(C))] = bad_value
    np.save(tmp_path / "lat.npy", lat)
    with pytest.raises(ShardInputError, match=rf"lat\.npy\[{k}\]: non-finite.*--on-error skip"):
        write_shards(tmp_path / "lat.npy", tmp_path / "stop", encoding="latent", workers=1, progress=False)
    m = write_shards(tmp_path / "lat.npy", tmp_path / "skip", encoding="latent", on_error="skip", workers=1,
                     progress=False)
    assert m["count"] == 8 and m["skipped"]["count"] == 1 and m["skipped"]["by_reason"] == {"non-finite": 1}
    assert m["skipped"]["items"][0]["path"].endswith(f"lat.npy[{k}]")
    got, _ = stored(tmp_path / "skip")
    kept = [p for p in write_order(9, 0) if p != k]
    np.testing.assert_array_equal(got, lat[kept].astype(np.float16))


def test_float16_overflow_is_non_finite(tmp_path, rng):
    lat = rand_latents(rng, 5)
    lat[3, 0, 0, 0] = 1e6                     # finite in float32, inf once stored as float16
    np.save(tmp_path / "lat.npy", lat)
    with pytest.raises(ShardInputError, match=r"lat\.npy\[3\]: non-finite.*overflow float16.*--dtype float32"):
        write_shards(tmp_path / "lat.npy", tmp_path / "o16", encoding="latent", workers=1, progress=False)
    m = write_shards(tmp_path / "lat.npy", tmp_path / "o32", encoding="latent", dtype="float32", workers=1,
                     progress=False)
    assert m["count"] == 5


def test_verify_catches_a_flipped_byte(tmp_path, rng):
    np.save(tmp_path / "lat.npy", rand_latents(rng, 10))
    write_shards(tmp_path / "lat.npy", tmp_path / "out", encoding="latent", max_count=5, workers=1, progress=False)
    tar = sorted((tmp_path / "out").glob("*.tar"))[1]
    sh = ShardSet(tmp_path / "out")
    i = 5 + int(rng.integers(0, 5))
    pos = int(sh.img_off[i]) + int(rng.integers(0, int(sh.img_size[i])))
    blob = bytearray(tar.read_bytes())
    blob[pos] ^= 1 << int(rng.integers(0, 8))
    tar.write_bytes(bytes(blob))
    ok, msg = verify(tmp_path / "out")
    assert not ok and tar.name in msg and "sha256" in msg


def test_bad_latent_inputs_are_clear_errors(tmp_path, rng):
    lat = rand_latents(rng, 4)
    np.save(tmp_path / "nhwc.npy", lat)
    np.save(tmp_path / "nchw.npy", lat.transpose(0, 3, 1, 2))
    np.save(tmp_path / "flat.npy", lat[..., 0])
    np.save(tmp_path / "u8.npy", rng.integers(0, 256, (4, R, R, 3), dtype=np.uint8))

    def shard(src, **kw):
        return write_shards(tmp_path / src, tmp_path / "o", encoding="latent", workers=1, progress=False,
                            overwrite=True, **kw)
    with pytest.raises(ShardInputError, match="pass --layout nchw"):
        shard("nchw.npy")                                   # (N, 4, 16, 16) read as NHWC: 4x16, not square
    with pytest.raises(ShardInputError, match="pass --layout nhwc"):
        shard("nhwc.npy", layout="nchw")
    with pytest.raises(ShardInputError, match="4 axes"):
        shard("flat.npy")
    with pytest.raises(ShardInputError, match="float16/float32 array, got uint8"):
        shard("u8.npy")
    with pytest.raises(ShardInputError, match="no image transforms"):
        shard("nhwc.npy", transform="resize", resolution=8)
    with pytest.raises(ShardInputError, match="not resized"):
        shard("nhwc.npy", resolution=8)
    with pytest.raises(ShardInputError, match="--format latent"):      # a float array without it
        write_shards(tmp_path / "nhwc.npy", tmp_path / "img", workers=1, progress=False)
    assert pdiff_cli(["shard", str(tmp_path / "nhwc.npy"), str(tmp_path / "c"), "--format", "latent", "--layout",
                      "nchw", "--quiet"]) == 1


# ----------------------------------------------------------------------------------------------
# Pipelines

@pytest.fixture(scope="module")
def latent_set(tmp_path_factory):
    """29 random 16x16x4 latents with labels, sharded as float16 and as float32."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng()
    lat = rand_latents(rng, 29)
    labels = rng.integers(0, 5, 29)
    np.savez(root / "l.npz", images=lat, labels=labels)
    for dt in ("float16", "float32"):
        write_shards(root / "l.npz", root / dt, encoding="latent", dtype=dt, max_count=8, workers=1, progress=False)
    order = write_order(29, 0)                  # sample k of the shards is input order[k]
    return root, lat[order], labels[order]


def make(root, dtype, backend, batch=4, seed=None, xflip=False, sizes=(4, 8, 16), probs=(0.4, 0.3, 0.3), world=1,
         rank=0, cache="none"):
    seed = int(np.random.default_rng().integers(1 << 30)) if seed is None else seed
    cfg = load_config(None, [f"data.path={root / dtype}", f"data.resolution={R}", f"data.channels={C}",
                             f"data.backend={backend}", "data.workers=0", f"train.batch={batch}",
                             f"train.seed={seed}", f"data.xflip={str(xflip).lower()}", f"data.cache={cache}"])
    sch = StochasticSchedule(R, batch, sizes=list(sizes), probs=list(probs), seed=seed)
    return build_pipeline(cfg, sch, rank, world, torch.device("cpu")), sch, cfg


def region(lat, index, x0, y0, s, flip, dtype):
    img = lat[index].astype(dtype)
    img = img[:, ::-1] if flip else img
    return torch.from_numpy(np.ascontiguousarray(img[y0:y0 + s, x0:x0 + s].transpose(2, 0, 1)).astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("xflip", [False, True])
def test_patches_are_the_stored_latents_at_their_offsets(latent_set, backend, dtype, xflip):
    root, lat, labels = latent_set
    pipe, sch, cfg = make(root, dtype, backend, xflip=xflip, world=2, rank=1)
    plan = SamplePlan(29, labels, sch, cfg.train.seed, 1, 2, xflip=xflip)
    seen, sizes, flipped = 0, set(), False
    for _ in range(10):
        b = next(pipe)
        step = plan.step(seen)
        s = b.patch_size
        assert b.images_seen == seen and s == step.patch_size
        sizes.add(s)
        n = sch.batch_for(s) // 2                      # B * R/s patches per step, split over 2 ranks
        assert b.patches.shape == (n, C, s, s) and b.patches.dtype == torch.float32
        np.testing.assert_array_equal(b.labels.numpy(), labels[step.indices])
        for j in range(n):
            x0, y0 = b.offsets[j].tolist()
            assert 0 <= x0 <= R - s and 0 <= y0 <= R - s
            flipped |= bool(step.flips[j])
            want = region(lat, step.indices[j], x0, y0, s, bool(step.flips[j]), dtype)
            assert torch.equal(b.patches[j], want)
        seen += sch.batch_for(s)
    pipe.close()
    assert len(sizes) >= 2 and flipped == xflip


@pytest.mark.parametrize("backend", BACKENDS)
def test_latent_resume_gives_identical_batches(latent_set, backend, tmp_path):
    root, _, _ = latent_set
    seed = int(np.random.default_rng().integers(1 << 30))
    ref = make(root, "float16", backend, seed=seed, xflip=True)[0]
    want = [next(ref) for _ in range(10)]                        # crosses epochs (29 samples)
    ref.close()
    run = make(root, "float16", backend, seed=seed, xflip=True)[0]
    for _ in range(6):
        next(run)
    torch.save(run.state_dict(), tmp_path / "state.pt")
    run.close()
    resumed = make(root, "float16", backend, seed=seed, xflip=True)[0]
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for w in want[6:]:
        got = next(resumed)
        assert got.images_seen == w.images_seen and got.patch_size == w.patch_size
        assert torch.equal(got.patches, w.patches) and torch.equal(got.offsets, w.offsets)
        assert torch.equal(got.labels, w.labels)
    resumed.close()


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_latent_backends_agree(latent_set):
    root, _, _ = latent_set
    seed = int(np.random.default_rng().integers(1 << 30))
    d = make(root, "float32", "dali", seed=seed, xflip=True)[0]
    t = make(root, "float32", "torch", seed=seed, xflip=True)[0]
    for _ in range(4):
        a, b = next(d), next(t)
        assert torch.equal(a.patches, b.patches) and torch.equal(a.offsets, b.offsets)
    d.close()
    t.close()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_latents_stay_float_in_the_in_memory_mode(latent_set, dtype):
    """data.cache keeps the latents in their stored type and gives the streaming pipeline's float32
    CHW patches, flips included."""
    root, _, _ = latent_set
    seed = int(np.random.default_rng().integers(1 << 30))
    stream = make(root, dtype, "torch", seed=seed, xflip=True, world=2, rank=0)[0]
    cached = make(root, dtype, "torch", seed=seed, xflip=True, world=2, rank=0, cache="host")[0]
    assert cached.data.dtype == getattr(torch, dtype)
    for _ in range(8):
        a, b = next(stream), next(cached)
        assert b.patches.dtype == torch.float32 and torch.equal(a.patches, b.patches)
        assert torch.equal(a.offsets, b.offsets)
    stream.close()
    cached.close()


def test_channel_mismatch_names_the_setting(latent_set):
    root, _, _ = latent_set
    cfg = load_config(None, [f"data.path={root / 'float16'}", f"data.resolution={R}", "data.channels=3"])
    with pytest.raises(Exception, match="data.channels=4"):
        build_pipeline(cfg, StochasticSchedule(R, 4), 0, 1)


# ----------------------------------------------------------------------------------------------
# The trainer

@pytest.mark.parametrize("arch", ["adm", "ddpmpp"])
def test_train_runs_on_latent_shards(latent_set, tmp_path, arch):
    from pdiff.checkpoint import CheckpointManager
    from pdiff.train import train
    root, _, _ = latent_set
    cfg = load_config("tiny", [f"network.arch={arch}", "network.model_channels=8", "network.channel_mult=[1,2]",
                               "network.num_blocks=1", "network.attn_resolutions=[8]",
                               f"data.path={root / 'float16'}", f"data.resolution={R}", f"data.channels={C}",
                               "data.backend=torch", "data.workers=0", "train.compile=false",
                               f"train.run_dir={tmp_path / 'run'}", "train.batch=8", "train.duration_images=64",
                               "train.log_every_images=16", "train.ckpt_every_images=64",
                               "train.snapshot_every_images=1000000000", "train.sample_every_images=1000000000",
                               "train.deterministic=false", "sample.steps=2"])
    assert train(cfg, "cpu") == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(np.isfinite(losses))
    state = CheckpointManager.load(CheckpointManager(tmp_path / "run").latest())
    assert state["images_seen"] >= 64
    shutil.rmtree(tmp_path / "run")


def test_rerun_keeps_latent_shards_and_other_options_are_refused(tmp_path, rng):
    np.save(tmp_path / "lat.npy", rand_latents(rng, 7))
    kw = dict(encoding="latent", workers=1, progress=False)
    m = write_shards(tmp_path / "lat.npy", tmp_path / "out", **kw)
    assert m["version"] == FORMAT_VERSION
    assert write_shards(tmp_path / "lat.npy", tmp_path / "out", **kw)["created"] == m["created"]   # already complete
    for other in (dict(dtype="float32"), dict(latent_scale=0.5)):
        with pytest.raises(ShardInputError, match="other options"):
            write_shards(tmp_path / "lat.npy", tmp_path / "out", **kw, **other)
    np.save(tmp_path / "img.npy", rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))
    assert write_shards(tmp_path / "img.npy", tmp_path / "img", workers=1, progress=False)["version"] == FORMAT_VERSION
