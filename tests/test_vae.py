"""Latent Patch Diffusion end to end with a tiny AutoencoderKL built from a config with random weights
(nothing is downloaded): `pdiff shard --encode-vae` stores the VAE's own posterior, resumes, and
records the VAE, in shards of format version 3 like any others (.cls labels, a CRC-32 per sample, the
seeded order; `pdiff shard verify` and data.on_corrupt apply, and a replaced sample keeps its row's
draw); the pipeline draws (mean + std * eps - shift) * scale from (seed, images seen);
training fills in the latent defaults; `pdiff sample` decodes with the run's VAE (diffusers' own
round trip) and refuses another one, naming both; `pdiff fid ref` reads the images the shards came
from."""
from __future__ import annotations

import json
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pdiff.config import ConfigError, load_config
from pdiff.latent import with_data_defaults
from pdiff.pipelines import build_pipeline, dali_available
from pdiff.pipelines.order import SamplePlan, latent_noise_seed
from pdiff.pipelines.sample_source import SourceError
from pdiff.pipelines.shards import ShardInputError, ShardSet, info, verify, write_shards
from pdiff.pipelines.shards.format import ShardError, load_manifest, read_crc_file
from pdiff.pipelines.shards.preprocess import _prepare
from pdiff.pipelines.shards.options import write_order
from pdiff.schedule import StochasticSchedule
from pdiff.vae import VAEError, load_vae, weights_sha256

# "memory": the in-memory mode (data.cache=host): the posteriors held in their stored type, drawn from
# after the gather as the streaming backends draw.
BACKENDS = ["torch", "memory", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                              reason="NVIDIA DALI is not installed"))]
IMAGE = 32          # images are 32 x 32, the tiny VAE downsamples 2x: 16 x 16 x 4 latents, stored 16 x 16 x 8


def tiny_autoencoder(seed: int, scale: float, shift: float | None):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=IMAGE, scaling_factor=scale,
                         shift_factor=shift).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny VAEs saved as diffusers folders (random weights, scale and shift), and a folder of
    images of several sizes in two class folders, one of them a corrupt file."""
    root = tmp_path_factory.mktemp("vae")
    rng = np.random.default_rng()
    scale, shift = float(rng.uniform(0.3, 0.9)), float(rng.uniform(-0.2, 0.2))
    for name, seed in (("vae", int(rng.integers(1 << 30))), ("other_vae", int(rng.integers(1 << 30)))):
        tiny_autoencoder(seed, scale, shift).save_pretrained(root / name)
    images = root / "images"
    for k in range(11):
        h, w = (int(x) for x in rng.integers(IMAGE, IMAGE + 20, 2))
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))
        path = images / ("cats" if k % 2 else "dogs") / f"{k:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)).save(path)
    (images / "dogs" / "05_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64))
    return {"root": root, "vae": root / "vae", "other": root / "other_vae", "images": images,
            "scale": scale, "shift": shift}


def encode(world, out: Path, **kw):
    opts = dict(resolution=IMAGE, transform="center-crop", encode_vae=str(world["vae"]), on_error="skip",
                workers=1, max_count=4, vae_batch=3, progress=False, device="cpu")
    return write_shards(world["images"], out, **{**opts, **kw})


def good_files(world, seed: int = 0) -> list[Path]:
    """The inputs in the order they are written (the listing, sorted paths, in the writer's seeded
    order), the broken one left out."""
    listed = sorted(world["images"].rglob("*.png"))
    return [listed[k] for k in write_order(len(listed), seed) if "broken" not in listed[k].name]


def good_images(world, seed: int = 0) -> list[np.ndarray]:
    """The inputs as the encoder sees them: transformed to IMAGE x IMAGE, in the order written."""
    return [_prepare(p.read_bytes(), str(p), IMAGE, 3, "center-crop") for p in good_files(world, seed)]


@pytest.fixture(scope="module")
def posterior_shards(world):
    out = world["root"] / "shards32"
    return out, encode(world, out, dtype="float32")


def test_stored_posterior_is_the_vaes_own(world, posterior_shards, tmp_path):
    out, m = posterior_shards
    vae = load_vae(world["vae"], "cpu")
    assert m["encoding"] == "latent" and m["stores"] == "posterior" and m["version"] == 4
    assert (m["resolution"], m["channels"], m["image_resolution"]) == (IMAGE // 2, 8, IMAGE)
    assert m["vae"]["sha256"] == weights_sha256(vae.model) and m["vae"]["source"] == str(world["vae"])
    assert m["scale"] == pytest.approx(world["scale"]) and m["shift"] == pytest.approx(world["shift"])
    assert m["count"] == 11 and m["skipped"]["count"] == 1 and "broken" in m["skipped"]["items"][0]["path"]
    assert m["num_classes"] == 2 and [r["count"] for r in m["shards"]] == [4, 4, 3]
    shards = ShardSet(out)
    stored = torch.from_numpy(np.stack([shards.decode(i) for i in range(shards.count)])).permute(0, 3, 1, 2)
    x = torch.from_numpy(np.stack(good_images(world))).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.model.encode(x).latent_dist           # diffusers' own posterior, one batch
    torch.testing.assert_close(stored[:, :4], dist.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored[:, 4:], dist.std, rtol=1e-5, atol=1e-5)
    assert shards.labels.tolist() == [int(p.parent.name == "dogs") for p in good_files(world)]   # cats 0, dogs 1
    ok, msg = verify(out)
    assert ok, msg
    assert "posterior" in info(out) and str(world["vae"]) in info(out)
    bare = tmp_path / "bare"                 # a vae record with only what load_manifest requires
    shutil.copytree(out, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest["vae"] = {k: manifest["vae"][k] for k in ("source", "sha256")}
    (bare / "manifest.json").write_text(json.dumps(manifest))
    assert "class not recorded" in info(bare)


def test_float16_posterior_and_a_bad_image_stops_by_default(world, posterior_shards, tmp_path):
    _, m32 = posterior_shards
    m16 = encode(world, tmp_path / "f16", vae_batch=5)
    a = np.stack([ShardSet(tmp_path / "f16").decode(i) for i in range(m16["count"])]).astype(np.float32)
    b = np.stack([ShardSet(posterior_shards[0]).decode(i) for i in range(m32["count"])])
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)     # float16 storage, another batch cut
    with pytest.raises(ShardInputError, match=r"05_broken\.png.*--on-error skip"):
        encode(world, tmp_path / "stop", on_error="stop")


def test_encoding_resumes_after_an_interruption(world, posterior_shards, tmp_path, monkeypatch):
    from pdiff.pipelines.shards import encode_vae
    real, calls = encode_vae.PosteriorEncoder.encode, []

    def crash_on_the_third_batch(self, results):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, results)
    monkeypatch.setattr(encode_vae.PosteriorEncoder, "encode", crash_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        encode(world, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert len(list((tmp_path / "out").glob("*.tar"))) == 1           # the first shard (4 images) finished
    monkeypatch.setattr(encode_vae.PosteriorEncoder, "encode", real)
    m = encode(world, tmp_path / "out", dtype="float32")
    want = posterior_shards[1]
    assert [r["sha256"] for r in m["shards"]][0] == want["shards"][0]["sha256"]
    a, b = ShardSet(tmp_path / "out"), ShardSet(posterior_shards[0])
    for i in range(a.count):      # the resumed part is encoded in other batches: float32 convolutions
        np.testing.assert_allclose(a.decode(i), b.decode(i), rtol=1e-5, atol=1e-5)   # differ in the last bits
    with pytest.raises(ShardInputError, match="other options"):          # another VAE is another run
        encode(world, tmp_path / "out", dtype="float32", encode_vae=str(world["other"]))


def test_bad_encode_options_are_named(world, tmp_path):
    with pytest.raises(ShardInputError, match="drop --format png"):
        encode(world, tmp_path / "a", encoding="png")
    with pytest.raises(ShardInputError, match="--latent-scale"):
        encode(world, tmp_path / "b", latent_scale=0.18)
    with pytest.raises(ShardInputError, match="multiple of 2"):
        encode(world, tmp_path / "c", resolution=IMAGE + 1)
    with pytest.raises(ShardInputError, match="no such folder"):
        encode(world, tmp_path / "d", encode_vae=str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------
# Posterior shards are shards like any other: format version 3 (.cls labels, a CRC-32 per sample,
# the seeded write order), checked by `pdiff shard verify` and under data.on_corrupt

def test_posterior_shards_carry_cls_labels_crcs_and_the_seeded_order(world, posterior_shards, tmp_path):
    out, m = posterior_shards
    assert m["label_ext"] == "cls" and m["shuffle_seed"] == 0
    shards = ShardSet(out)
    assert shards.checksummed
    k = 0
    for rec in m["shards"]:                       # the members as WebDataset reads them, a CRC-32 of each and each row
        records = read_crc_file(out, rec, m["resolution"])
        with tarfile.open(out / rec["tar"]) as tar:
            members = tar.getmembers()
            assert [x.name for x in members] == [f"{k + j // 2:09d}.{'lat' if j % 2 == 0 else 'cls'}"
                                                 for j in range(2 * rec["count"])]
            for j in range(rec["count"]):
                lat, cls = (tar.extractfile(x).read() for x in members[2 * j:2 * j + 2])
                r = records[j]
                assert (int(r["data_crc"]), int(r["label_crc"]), int(r["label"])) == (zlib.crc32(lat), zlib.crc32(cls),
                                                                                        int(cls))
                row = len(lat) // m["resolution"]
                assert r["row_crc"].tolist() == [zlib.crc32(lat[y * row:(y + 1) * row]) for y in range(m["resolution"])]
                assert int(cls) == shards.labels[k + j]
        k += rec["count"]
    assert ("version 4, labels .cls, a CRC file per shard (a CRC-32 per member and per row), written in a random "
            "order (seed 0)") in info(out)
    # another seed deals the same posteriors in its own order, and the FID reference follows it
    seed = int(np.random.default_rng().integers(1, 1 << 20))
    other = encode(world, tmp_path / "seeded", dtype="float32", shuffle_seed=seed)
    first, then = good_files(world), good_files(world, seed)
    assert then != first and sorted(then) == sorted(first)
    reseeded = ShardSet(tmp_path / "seeded")
    for k, path in enumerate(then):
        np.testing.assert_allclose(reseeded.decode(k), shards.decode(first.index(path)), rtol=1e-5, atol=1e-5)
        assert reseeded.labels[k] == int(path.parent.name == "dogs")
    from pdiff.pipelines.shards.encode_vae import EncodedImages
    np.testing.assert_array_equal(np.concatenate(list(EncodedImages(other).batches(4))),
                                  np.stack(good_images(world, seed)))


def test_latent_manifests_say_what_they_store(posterior_shards, tmp_path):
    """A version 3 latent manifest without 'stores', a posterior one of an older version or without its
    VAE record, is named as damaged instead of being trained on as something else."""
    out, m = posterior_shards
    edits = {"no-stores": ({"stores": None}, "'stores' is None"),
             "old-posterior": ({"version": 2}, "version 2 whose 'stores' is 'posterior'"),
             "no-vae": ({"vae": None}, "a 'vae' record"),
             "odd-channels": ({"channels": 7}, "even channel count")}
    for name, (edit, message) in edits.items():
        folder = tmp_path / name
        folder.mkdir()
        broken = {k: v for k, v in {**m, **edit}.items() if v is not None}
        (folder / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(ShardError, match=message):
            load_manifest(folder)
    assert load_manifest(out)["stores"] == "posterior"


@pytest.fixture(scope="module")
def damaged_posterior(world, posterior_shards):
    """A copy of the float32 posterior shards with one bit flipped in one sample's .lat member: -> (folder,
    that sample's index)."""
    out, _ = posterior_shards
    rng = np.random.default_rng()
    clean = ShardSet(out)
    bad = world["root"] / "damaged32"
    shutil.copytree(out, bad)
    i = int(rng.integers(clean.count))
    tar = bad / Path(clean.tars[clean.shard[i]]).name
    blob = bytearray(tar.read_bytes())
    blob[int(clean.img_off[i]) + int(rng.integers(clean.img_size[i]))] ^= 1 << int(rng.integers(8))
    tar.write_bytes(bytes(blob))
    return bad, i


def test_verify_and_training_name_a_damaged_posterior_sample(damaged_posterior):
    bad, i = damaged_posterior
    ok, msg = verify(bad, workers=1)
    assert not ok and "1 damaged sample(s)" in msg and f"sample {i:09d}" in msg and "fails its CRC-32 check" in msg
    pipe, _ = pipeline(bad, int(np.random.default_rng().integers(1 << 30)))        # data.on_corrupt=stop
    with pytest.raises(SourceError) as e:
        # Version 4 checks the rows a patch reads: a half-size patch may miss the damaged row, so run
        # until a step reads it (64 steps of 4..8 samples read each of the 11 whole ~17 times).
        for _ in range(64):
            next(pipe)
    pipe.close()
    assert f"sample {i:09d}" in str(e.value) and "CRC-32" in str(e.value)
    assert f"pdiff shard verify {bad}" in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_draws_the_replacement_with_the_rows_noise_and_resumes_exactly(posterior_shards, damaged_posterior,
                                                                           backend):
    """data.on_corrupt=skip on posterior shards: the damaged sample's rows hold a draw from the next
    sample's posterior with the row's own eps (from seed and images seen), and a resumed run repeats
    the uninterrupted one bit for bit, replacements and draws included. Format version 4: the torch and
    DALI backends read a patch by its rows and check those, so a patch of the damaged sample that misses the
    damaged row is its own (clean) rows; the in-memory mode loads whole samples, so it always replaces."""
    out, m = posterior_shards
    bad, i = damaged_posterior
    seed = int(np.random.default_rng().integers(1 << 30))
    clean = ShardSet(out)
    tar = Path(clean.tars[clean.shard[i]]).name
    diff = np.flatnonzero(np.frombuffer((out / tar).read_bytes(), np.uint8) != np.frombuffer((bad / tar).read_bytes(),
                                                                                             np.uint8))
    bad_row = (int(diff[0]) - int(clean.img_off[i])) // (int(clean.img_size[i]) // m["resolution"])
    stored = np.stack([clean.decode(k) for k in range(clean.count)])
    skip = ["data.on_corrupt=skip"]
    pipe, sch = pipeline(bad, seed, backend=backend, overrides=skip)
    plan = SamplePlan(clean.count, clean.labels, sch, seed, 0, 1, xflip=True)
    batches, planned, seen = [], 0, 0
    for k in range(8):
        b, step = next(pipe), plan.step(seen)
        s = b.patch_size
        eps = torch.randn((sch.batch_for(s), 4, s, s), generator=torch.Generator().manual_seed(
            latent_noise_seed(seed, seen)))
        for j, (index, (x0, y0)) in enumerate(zip(step.indices, b.offsets.tolist())):
            hit = backend == "memory" or s == m["resolution"] or y0 <= bad_row < y0 + s
            used = (index + 1) % clean.count if index == i and hit else index
            planned += int(index == i and hit)
            img = stored[used][:, ::-1] if step.flips[j] else stored[used]
            post = torch.from_numpy(np.ascontiguousarray(img[y0:y0 + s, x0:x0 + s].transpose(2, 0, 1)))
            torch.testing.assert_close(b.patches[j], (post[:4] + post[4:] * eps[j] - m["shift"]) * m["scale"],
                                       rtol=1e-6, atol=1e-6)
            assert int(b.labels[j]) == int(clean.labels[used])
        if k == 3:
            state = pipe.state_dict()
        batches.append(b)
        seen += sch.batch_for(s)
    pipe.close()
    assert planned > 0 and pipe.corrupt.found == {i} and pipe.corrupt.replaced == planned
    resumed, _ = pipeline(bad, seed, backend=backend, overrides=skip)
    resumed.load_state_dict(state)
    for want in batches[4:]:
        got = next(resumed)
        assert torch.equal(got.patches, want.patches) and torch.equal(got.labels, want.labels)
    resumed.close()
    assert resumed.corrupt.state_dict() == pipe.corrupt.state_dict()


# ----------------------------------------------------------------------------------------------
# Training data: the draw from the posterior

def pipeline(out: Path, seed: int, rank=0, world_size=1, batch=4, backend="torch", overrides=()):
    """backend: torch, dali, or memory (data.cache=host)."""
    where = ["data.backend=torch", "data.cache=host"] if backend == "memory" else [f"data.backend={backend}"]
    cfg = load_config("tiny_latent", [f"data.path={out}", *where, "data.workers=0",
                                      f"train.batch={batch}", f"train.seed={seed}", "data.xflip=true", *overrides])
    sch = StochasticSchedule(cfg.data.resolution, batch, sizes=[8, 16], probs=[0.5, 0.5], seed=seed)
    return build_pipeline(cfg, sch, rank, world_size, torch.device("cpu")), sch


@pytest.mark.parametrize("backend", BACKENDS)
def test_patches_are_draws_from_the_stored_posterior(world, posterior_shards, backend):
    out, m = posterior_shards
    seed = int(np.random.default_rng().integers(1 << 30))
    shards = ShardSet(out)
    stored = np.stack([shards.decode(i) for i in range(shards.count)])
    pipe, sch = pipeline(out, seed, rank=1, world_size=2, backend=backend)
    assert pipe.backend == backend
    plan = SamplePlan(shards.count, shards.labels, sch, seed, 1, 2, xflip=True)
    seen = 0
    for _ in range(6):
        b, step = next(pipe), plan.step(seen)
        s = b.patch_size
        eps = torch.randn((sch.batch_for(s), 4, s, s), generator=torch.Generator().manual_seed(
            latent_noise_seed(seed, seen)))[1::2]
        for j, (i, (x0, y0)) in enumerate(zip(step.indices, b.offsets.tolist())):
            img = stored[i][:, ::-1] if step.flips[j] else stored[i]
            post = torch.from_numpy(np.ascontiguousarray(img[y0:y0 + s, x0:x0 + s].transpose(2, 0, 1)))
            want = (post[:4] + post[4:] * eps[j] - m["shift"]) * m["scale"]
            torch.testing.assert_close(b.patches[j], want, rtol=1e-6, atol=1e-6)
        seen += sch.batch_for(s)
    pipe.close()


def test_the_draw_is_the_same_after_a_resume_and_across_ranks(posterior_shards, tmp_path):
    out, _ = posterior_shards
    seed = int(np.random.default_rng().integers(1 << 30))
    ref, _ = pipeline(out, seed)
    want = [next(ref) for _ in range(8)]                     # crosses epochs: 11 samples
    ref.close()
    run, _ = pipeline(out, seed)
    for _ in range(5):
        next(run)
    torch.save(run.state_dict(), tmp_path / "state.pt")
    run.close()
    resumed, _ = pipeline(out, seed)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for w in want[5:]:
        got = next(resumed)
        assert got.images_seen == w.images_seen and torch.equal(got.patches, w.patches)
    resumed.close()
    # two ranks draw the rows one process draws (4 samples of 11 divide evenly only within an epoch)
    ranks = [pipeline(out, seed, r, 2)[0] for r in (0, 1)]
    b0, b1 = next(ranks[0]), next(ranks[1])
    assert torch.equal(b0.patches, want[0].patches[0::2]) and torch.equal(b1.patches, want[0].patches[1::2])
    for p in ranks:
        p.close()


def test_data_defaults_for_latent_shards(world, posterior_shards):
    out, m = posterior_shards
    cfg = with_data_defaults(load_config("tiny_latent", [f"data.path={out}", "patch.sizes=[]", "patch.probs=[]",
                                                         "patch.real_p=0.3"]))
    assert cfg.patch.sizes == [8, 16] and cfg.patch.probs == pytest.approx([0.7, 0.3])
    assert cfg.vae.source == str(world["vae"]) and cfg.vae.sha256 == m["vae"]["sha256"]
    assert (cfg.vae.scale, cfg.vae.shift) == (m["scale"], m["shift"])
    kept = with_data_defaults(load_config("tiny_latent", [f"data.path={out}", "vae.source=/moved/vae"]))
    assert kept.patch.sizes == [8, 16] and kept.vae.source == "/moved/vae"
    other = load_vae(world["other"], "cpu").sha256
    with pytest.raises(ConfigError, match=f"{other[:12]}.*{m['vae']['sha256'][:12]}"):
        with_data_defaults(load_config("tiny_latent", [f"data.path={out}", f"vae.sha256={other}"]))
    with pytest.raises(ConfigError, match="vae.scale"):
        with_data_defaults(load_config("tiny_latent", [f"data.path={out}", "vae.scale=3.0"]))
    pixels = with_data_defaults(load_config("tiny", ["data.path=/nowhere"]))
    assert pixels.patch.sizes == [] and pixels.vae.source == ""


# ----------------------------------------------------------------------------------------------
# Decoding

def test_decode_of_encode_matches_diffusers_round_trip(world):
    vae = load_vae(world["vae"], "cpu")
    x = torch.from_numpy(np.stack(good_images(world)[:5])).permute(0, 3, 1, 2).float() / 127.5 - 1
    mean, std = vae.encode(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    latents = vae.to_latent(mean)                  # what the network learns: (z - shift) * scale
    assert not torch.allclose(latents, mean)
    ours = vae.decode(latents, batch=2)
    with torch.no_grad():
        theirs = vae.model(x, sample_posterior=False).sample    # encode -> posterior mode -> decode
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.shape == (5, 3, IMAGE, IMAGE)


@pytest.mark.slow
def test_images_in_images_out(world, posterior_shards, tmp_path, capsys):
    """encode -> shard -> train a few steps -> sample -> decode -> PNG, as a user runs it; then FID of
    the decoded samples against the source images."""
    from pdiff.tools import sample as sample_cli
    from pdiff.train import train
    out, m = posterior_shards
    run = tmp_path / "run"
    cfg = load_config("tiny_latent", [f"data.path={out}", "data.backend=torch", "data.workers=0",
                                      "patch.sizes=[]", "patch.probs=[]", "network.label_dim=2",
                                      "network.label_dropout=0.2", f"train.run_dir={run}", "train.batch=4",
                                      "train.duration_images=48", "train.log_every_images=16",
                                      "train.ckpt_every_images=48", "train.snapshot_every_images=48",
                                      "train.sample_every_images=48", "sample.steps=2"])
    assert train(cfg, "cpu") == 0
    saved = load_config(run / "config.yaml")
    assert saved.vae.sha256 == m["vae"]["sha256"] and saved.patch.sizes == [8, 16]
    grid = np.asarray(Image.open(next((run / "samples").glob("*.png"))))
    assert grid.shape[2] == 3 and grid.shape[0] == 6 * IMAGE + 5              # 36 decoded images, 1 px gaps
    snap = next((run / "snapshots").glob("*.safetensors"))
    common = ["--snapshot", str(snap), "--seeds", "0-4", "--batch", "3", "--device", "cpu", "--no-progress",
              "--guidance", "2", "--guidance-interval", "0.5,20"]
    assert sample_cli.main(common + ["--outdir", str(tmp_path / "png"), "--npz", str(tmp_path / "s.npz"),
                                     "--grid", str(tmp_path / "grid.png")]) == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{s:06d}.png" for s in range(5)]
    img = np.asarray(Image.open(pngs[0]))
    assert img.shape == (IMAGE, IMAGE, 3) and img.std() > 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (5, IMAGE, IMAGE, 3) and z["images"].dtype == np.uint8
        np.testing.assert_array_equal(z["images"][0], img)
    # the same seeds decoded by hand: the sampler's latents through the VAE
    from pdiff.generate import SampleOptions, generate, to_uint8
    from pdiff.snapshot import load_snapshot
    model, scfg, _ = load_snapshot(snap)
    opts = SampleOptions(sampler=scfg.sample)
    opts.sampler.guidance, opts.sampler.guidance_interval = 2.0, [0.5, 20.0]
    lat, _ = generate(model, [0], scfg.data.resolution, 4, 2, opts)
    by_hand = to_uint8(load_vae(world["vae"], "cpu").decode(lat))     # its own scale and shift: the data's
    assert np.abs(by_hand[0].permute(1, 2, 0).numpy().astype(int) - img.astype(int)).max() <= 1
    # another VAE is refused, naming both
    capsys.readouterr()
    from pdiff import cli
    assert cli.main(["sample", *common, "--outdir", str(tmp_path / "x"), "--vae", str(world["other"])]) == 2
    err = capsys.readouterr().err
    assert str(world["other"]) in err and str(world["vae"]) in err and m["vae"]["sha256"][:12] in err
    assert not (tmp_path / "x").exists()

    # FID: the reference from the images the shards were encoded from, the samples decoded as above
    from pdiff.fid import load_inception, load_stats
    from pdiff.tools import fid as fid_cli
    weights = tmp_path / "inception_random.pth"
    torch.save(load_inception(random_init=True, seed=1).state_dict(), weights)
    fid = ["--inception", str(weights), "--device", "cpu", "--no-progress"]
    assert fid_cli.main(["ref", "--data", str(out), "--out", str(tmp_path / "ref.npz"), *fid]) == 0
    ref = load_stats(tmp_path / "ref.npz")
    assert ref.count == 11 and ref.resolution == IMAGE                     # images, not 16x16 latents
    assert fid_cli.main(["gen", *common[:2], "--ref", str(tmp_path / "ref.npz"), "--num", "5", "--sets", "1",
                         "--batch", "3", "--guidance", "2", "--guidance-interval", "0.5,20",
                         "--json", str(tmp_path / "gen.json"), *fid]) == 0
    assert fid_cli.main(["calc", "--images", str(tmp_path / "png"), "--ref", str(tmp_path / "ref.npz"),
                         "--json", str(tmp_path / "calc.json"), *fid]) == 0
    gen, calc = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("gen", "calc"))
    assert gen["fid"][0] == pytest.approx(calc["fid"], rel=1e-5)          # seeds 0-4 decoded alike


def test_another_vae_is_refused_naming_both(world, posterior_shards):
    from pdiff.vae import load_run_vae
    out, m = posterior_shards
    cfg = with_data_defaults(load_config("tiny_latent", [f"data.path={out}"]))
    vae = load_run_vae(cfg, None, "cpu")
    assert vae.sha256 == m["vae"]["sha256"] and vae.scale == m["scale"]
    with pytest.raises(VAEError) as e:
        load_run_vae(cfg, str(world["other"]), "cpu")
    text = str(e.value)
    assert str(world["vae"]) in text and str(world["other"]) in text and m["vae"]["sha256"][:12] in text


def test_fid_reference_comes_from_the_source_images(world, posterior_shards):
    from pdiff.tools.fid import open_images
    out, _ = posterior_shards
    src = open_images(str(out))
    assert src.count == 11 and src.side == IMAGE
    got = np.concatenate(list(src.batches(4)))
    np.testing.assert_array_equal(got, np.stack(good_images(world)))


# ----------------------------------------------------------------------------------------------
# The benchmark: latent shards against pixel shards + the encoder in every step

def test_bench_data_on_latent_shards_and_with_online_encoding(world, posterior_shards, tmp_path, one_thread):
    from pdiff.tools import bench as bench_cli
    out, _ = posterior_shards
    pixels = write_shards(world["images"], tmp_path / "pixels", resolution=IMAGE, transform="center-crop",
                          on_error="skip", workers=1, progress=False)
    assert pixels["count"] == 11
    common = ["--config", "tiny_latent", "data.backend=torch", "data.workers=0", "train.batch=2", "--quick",
              "--device", "cpu"]
    assert bench_cli.main(["data", *common, f"data.path={out}", "patch.sizes=[]", "patch.probs=[]",
                           "--out", str(tmp_path / "latent.json")]) == 0
    latent = json.loads((tmp_path / "latent.json").read_text())["results"]
    assert set(latent["results"]) == {"s=8", "s=16", "schedule"}          # {R/2, R} from the latent shards
    assert all(v["images_per_cpu_s"] > 0 for v in latent["results"].values())
    assert bench_cli.main(["data", *common, f"data.path={tmp_path / 'pixels'}", f"data.resolution={IMAGE}",
                           "data.channels=3", "--online-vae", str(world["vae"]), "--out",
                           str(tmp_path / "online.json")]) == 0
    online = json.loads((tmp_path / "online.json").read_text())["results"]
    row = online["results"]["online-vae"]
    assert online["vae"]["sha256"] == load_vae(world["vae"], "cpu").sha256 and online["latent_resolution"] == 16
    assert row["patches_per_step"] == 2 and row["images_per_s"] > 0 and row["cpu_s_per_image"] > 0


def test_latent_data_benchmark_script_and_its_table_row(tmp_path, one_thread):
    import importlib.util
    repo = Path(__file__).resolve().parents[1]

    def load(name):
        spec = importlib.util.spec_from_file_location(name, repo / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    assert load("bench_latent_data").main(["--quick", "--images", "6", "--batch", "2", "--steps", "1",
                                           "--device", "cpu", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    p = json.loads(path.read_text())
    lat, onl = p["latent_shards"]["results"]["schedule"], p["online_vae"]["results"]["online-vae"]
    assert p["ratio_images_per_cpu_s"] == pytest.approx(lat["images_per_cpu_s"] / onl["images_per_cpu_s"])
    assert p["latent_resolution"] == 16 and p["image_resolution"] == 32 and p["machine"]["cpu"]
    assert p["offline_encoding"]["images"] == 6 and p["offline_encoding"]["cpu_s_per_image"] > 0
    name, (line,) = load("make_table").headlines(path, p)
    assert name == "bench_latent_data (quick)" and f"= {p['ratio_images_per_cpu_s']:.0f}x" in line


def test_latents_you_encoded_decode_with_the_vae_you_name(world, tmp_path):
    """A model trained on `--format latent` shards (no VAE record, the data's scale in vae.scale) samples
    images with --vae, decoding z = latent / scale + shift."""
    from pdiff.generate import SampleOptions, generate, to_uint8
    from pdiff.model import build_model
    from pdiff.snapshot import save_snapshot
    from pdiff.tools import sample as sample_cli
    scale = float(np.random.default_rng().uniform(0.2, 0.9))
    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    cfg = load_config("tiny_latent", [f"vae.scale={scale}", "sample.steps=2"])
    snap = save_snapshot(tmp_path / "s.safetensors", build_model(cfg), cfg, 1)
    assert sample_cli.main(["--snapshot", str(snap), "--seeds", "3", "--device", "cpu", "--no-progress",
                            "--outdir", str(tmp_path / "png"), "--vae", str(world["vae"])]) == 0
    got = np.asarray(Image.open(tmp_path / "png" / "000003.png"))
    model = build_model(cfg)
    from safetensors.torch import load_file
    model.load_state_dict(load_file(snap))
    lat, _ = generate(model.eval(), [3], 16, 4, 0, SampleOptions(sampler=cfg.sample))
    vae = load_vae(world["vae"], "cpu")
    with torch.no_grad():
        want = to_uint8(vae.model.decode(lat / scale).sample)[0].permute(1, 2, 0).numpy()
    assert got.shape == (IMAGE, IMAGE, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_vae_errors_say_what_to_do(world, tmp_path, monkeypatch):
    from pdiff.vae import load_run_vae
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(tmp_path, "cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(VAEError, match="expected a diffusers folder"):
        load_vae(tmp_path / "weights.bin", "cpu")
    pixels = load_config("tiny")
    with pytest.raises(VAEError, match="needs no --vae"):
        load_run_vae(pixels, str(world["vae"]), "cpu")
    assert load_run_vae(pixels, None, "cpu") is None
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)        # as if not installed
    with pytest.raises(VAEError, match=r"pdiff\[latent\]"):
        load_vae(world["vae"], "cpu")


def test_in_training_fid_scores_decoded_images(world, tmp_path, capsys, one_thread):
    from pdiff import fid as F
    from pdiff.model import build_model
    cfg = load_config("tiny_latent", ["sample.steps=2"])
    model = build_model(cfg).eval()
    net = F.load_inception(random_init=True)
    rng = np.random.default_rng()
    for side in (IMAGE, IMAGE // 2):
        F.save_stats(tmp_path / f"ref{side}.npz", rng.normal(size=2048) * 0.1, np.eye(2048) * 1e-3, 50, side)
    assert F.FIDEvaluator.maybe(tmp_path / f"ref{IMAGE}.npz", net, channels=4) is None    # latents, no decoder
    assert "no VAE" in capsys.readouterr().out
    vae = load_vae(world["vae"], "cpu")
    ev = F.FIDEvaluator.maybe(tmp_path / f"ref{IMAGE}.npz", net, channels=4, vae=vae, num_images=2, batch=2)
    assert np.isfinite(ev.compute(model, cfg))                    # 32x32 decoded images against a 32x32 reference
    with pytest.raises(F.FIDError, match="16x16"):
        F.FIDEvaluator(tmp_path / f"ref{IMAGE // 2}.npz", net, num_images=2, vae=vae).compute(model, cfg)
