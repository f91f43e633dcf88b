"""FID: the Fréchet distance against scipy, feature statistics, the Inception feature path end to end
(random weights, never a download), and the errors a user meets first."""
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import scipy.linalg
import torch

from pdiff import fid as F
from pdiff.cli import main as pdiff_cli
from pdiff.tools import fid as fid_cli


def scipy_frechet(mu1, s1, mu2, s2):
    """The textbook float64 computation (pytorch-fid's, without its eps retry)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def random_stats(rng, dim, n, scale=1.0, shift=0.0):
    mix = rng.normal(size=(dim, dim)) * scale / np.sqrt(dim)
    x = rng.normal(size=(n, dim)) @ mix + shift + rng.normal(size=dim) * 0.1
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim,n", [(48, 3000), (96, 400)])
def test_frechet_matches_scipy(dim, n):
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    mu1, s1 = random_stats(rng, dim, n)
    mu2, s2 = random_stats(rng, dim, n, scale=1.7, shift=0.3)
    ours, ref = F.frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
    assert ours > 0
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("dim,n", [(96, 30), (160, 50)])
def test_frechet_nearly_singular(dim, n):
    # fewer samples than dimensions: rank-deficient covariances, as with small in-training FID
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    mu1, s1 = random_stats(rng, dim, n)
    mu2, s2 = random_stats(rng, dim, n, scale=0.5)
    assert np.linalg.matrix_rank(s1) < dim
    ours, ref = F.frechet_distance(mu1, s1, mu2, s2), scipy_frechet(mu1, s1, mu2, s2)
    assert np.isfinite(ours) and ours == pytest.approx(ref, rel=1e-6)
    # scipy's sqrtm of a singular product is the inexact side; the symmetric form agrees tighter
    r1 = scipy.linalg.sqrtm(s1).real
    sym = np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    direct = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * sym)
    assert ours == pytest.approx(direct, rel=1e-7)


@pytest.mark.parametrize("n", [30, 5000])
def test_frechet_identical_is_zero(n):
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    mu, s = random_stats(rng, 160, n, scale=3.0)
    assert abs(F.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    assert F.frechet_distance(mu, s, mu + 0.5, s) == pytest.approx(0.25 * 160, rel=1e-9)


@pytest.mark.parametrize("n", [5, 70])
def test_frechet_lowrank_equals_full(n):
    """Few images: the n x n route gives the full distance (and FeatureStats picks it)."""
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    dim = 90
    feats = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.2 + 1.0
    mu2, s2 = random_stats(rng, dim, 500, scale=1.3)
    mu1, s1 = feats.mean(0), np.cov(feats, rowvar=False)
    full = F.frechet_distance(mu1, s1, mu2, s2)
    # the full route takes roots of a rank-(n-1) matrix, whose zero eigenvalues carry sqrt(eps) noise
    assert F.frechet_distance_lowrank(feats, mu2, s2) == pytest.approx(full, rel=1e-7)
    st = F.FeatureStats(dim=dim, keep=100)
    for part in np.array_split(feats, 3):
        st.update(torch.from_numpy(part))
    assert st.features is not None
    assert st.fid_against(F.RefStats(mu2, s2, 500, None)) == pytest.approx(full, rel=1e-7)
    assert abs(F.frechet_distance_lowrank(feats, mu1, s1)) < 1e-9 * np.trace(s1)
    st.update(torch.from_numpy(rng.normal(size=(100, dim))))  # past ``keep``: back to sums only
    assert st.features is None and st.count == n + 100


def test_frechet_shape_mismatch():
    with pytest.raises(F.FIDError, match="do not match"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_batched_equals_numpy():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    feats = torch.randn(137, 2048, generator=g, dtype=torch.float64) * 3 + 1
    st = F.FeatureStats()
    for part in feats.split(50):
        st.update(part)
    mu, cov = st.mean_cov()
    x = feats.numpy()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(F.FIDError, match="at least 2"):
        F.FeatureStats().mean_cov()


def test_stats_file_roundtrip_and_foreign_files(tmp_path):
    rng = np.random.default_rng()
    mu, s = rng.normal(size=2048), np.diag(rng.random(2048))
    F.save_stats(tmp_path / "ref.npz", mu, s, count=12, resolution=64, source="x")
    ref = F.load_stats(tmp_path / "ref.npz")
    assert ref.resolution == 64 and ref.count == 12
    np.testing.assert_array_equal(ref.mu, mu)
    # EDM / pytorch-fid reference files: just mu and sigma, resolution unknown
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=s)
    assert F.load_stats(tmp_path / "edm.npz").resolution is None
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(F.FIDError, match="no 'mu' and 'sigma'"):
        F.load_stats(tmp_path / "bad.npz")
    with pytest.raises(F.FIDError, match="fid ref"):
        F.load_stats(tmp_path / "missing.npz")


def test_wrong_resolution_reference_message(tmp_path, capsys):
    rng = np.random.default_rng()
    F.save_stats(tmp_path / "ref64.npz", rng.normal(size=2048), np.eye(2048), 10, 64)
    F.save_stats(tmp_path / "cur32.npz", rng.normal(size=2048), np.eye(2048), 10, 32)
    with pytest.raises(F.FIDError, match=r"64x64 images but the images to score are 32x32"):
        F.check_resolution(F.load_stats(tmp_path / "ref64.npz"), 32)
    rc = pdiff_cli(["fid", "calc", "--images", str(tmp_path / "cur32.npz"), "--ref", str(tmp_path / "ref64.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "64x64" in err and "32x32" in err and "--allow-resolution-mismatch" in err
    # images are checked before any Inception work (here: before it finds no weights)
    np.savez(tmp_path / "imgs16.npz", images=np.zeros((3, 16, 16, 3), np.uint8))
    rc = pdiff_cli(["fid", "calc", "--images", str(tmp_path / "imgs16.npz"), "--ref", str(tmp_path / "ref64.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "16x16" in err and "weights" not in err
    F.check_resolution(F.load_stats(tmp_path / "ref64.npz"), 32, allow_mismatch=True)
    F.check_resolution(F.load_stats(tmp_path / "ref64.npz"), 64)


def test_missing_weights_error_names_url_and_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path / "cache"))

    def offline(url, dest):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(F, "_fetch", offline)
    for source in (None, tmp_path / "nope.pth"):
        with pytest.raises(F.InceptionWeightsMissing) as e:
            F.load_inception(source)
        assert F.FID_WEIGHTS_URL in str(e.value) and "--inception" in str(e.value)
    np.savez(tmp_path / "imgs.npz", images=np.zeros((3, 8, 8, 3), np.uint8))
    F.save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048), 3, 8)
    rc = pdiff_cli(["fid", "calc", "--images", str(tmp_path / "imgs.npz"), "--ref", str(tmp_path / "ref.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and F.FID_WEIGHTS_URL in err and "--inception" in err


def test_url_weights_come_from_cache_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("PDIFF_CACHE", str(tmp_path))

    def no_network(*a, **k):
        raise AssertionError("tests must never download")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(F.InceptionWeightsMissing, match="not cached"):
        F.resolve_weights(F.FID_WEIGHTS_URL, download=False)
    net = F.load_inception(random_init=True)
    # the released file predates BatchNorm's num_batches_tracked: loading must not need it
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    loaded = F.load_inception(F.FID_WEIGHTS_URL)
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(F.FIDError, match="not the TF-FID Inception weights"):
        F.load_inception(tmp_path / "other.pth")


def test_inception_layout_matches_pytorch_fid_weights():
    sd = F.FIDInceptionV3().state_dict()
    # torchvision's Inception-v3 without aux logits, 1008 classes: what the released file holds
    assert sd["fc.weight"].shape == (1008, 2048)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Mixed_7a.branch7x7x3_4.conv.weight"].shape == (192, 192, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert not any(k.startswith("AuxLogits") for k in sd)
    n_bn = sum(k.endswith("bn.running_var") for k in sd)
    assert n_bn == 94 and sd["Mixed_7c.branch1x1.bn.running_var"].shape == (320,)


def test_tf_pooling_quirks():
    """Pool branches: the TF average pool ignores padding; the last block max-pools."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.rand(1, 5, 4, 4) + 1
    a = F._tf_avg_pool(x)
    # a corner sees 4 real pixels; their mean, not the mean over 9 with 5 zeros
    assert torch.allclose(a[0, :, 0, 0], x[0, :, :2, :2].mean(dim=(1, 2)))
    blk = F.FIDInceptionE(2048, max_pool=True).eval()
    seen = {}
    blk.branch_pool.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    with torch.no_grad():
        y = torch.randn(1, 2048, 3, 3)
        blk(y)
    assert torch.allclose(seen["in"], torch.nn.functional.max_pool2d(y, 3, 1, 1))


def _random_weights(tmp_path):
    net = F.load_inception(random_init=True, seed=1)
    path = tmp_path / "inception_random.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_feature_path_end_to_end(tmp_path, capsys):
    """Images -> resize to 299 -> Inception (random weights) -> stats file -> FID, through the CLI;
    folder and .npz sources give the same statistics."""
    from PIL import Image
    torch.set_num_threads(1)
    net, weights = _random_weights(tmp_path)
    rng = np.random.default_rng()
    imgs = rng.integers(0, 256, size=(5, 24, 24, 3), dtype=np.uint8)
    other = np.clip(imgs.astype(int) // 2 + 100, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", x=imgs)
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "folder" / ("sub" if i % 2 else "") / f"{i:03d}.png")
    np.savez(tmp_path / "other.npz", images=other)

    assert fid_cli.main(["ref", "--data", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "stats.npz"),
                         "--inception", str(weights), "--fid-batch", "2", "--device", "cpu", "--no-progress"]) == 0
    ref = F.load_stats(tmp_path / "stats.npz")
    assert ref.count == 5 and ref.resolution == 24
    direct = F.inception_features(net, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert direct.shape == (5, 2048) and direct.std() > 1e-3   # features are not degenerate
    chunked = F.inception_features(net, torch.from_numpy(imgs).permute(0, 3, 1, 2), chunk=2)
    torch.testing.assert_close(chunked, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.mu, direct.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(direct.numpy(), rowvar=False), rtol=1e-4, atol=1e-7)

    # the same images as `pdiff shard` shards give the same reference
    from pdiff.tools import shard as shard_cli
    assert shard_cli.main([str(tmp_path / "ref.npz"), str(tmp_path / "shards"), "--images-key", "x",
                           "--workers", "1", "--quiet"]) == 0
    assert fid_cli.main(["ref", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "stats2.npz"),
                         "--inception", str(weights), "--fid-batch", "3", "--device", "cpu", "--no-progress"]) == 0
    ref2 = F.load_stats(tmp_path / "stats2.npz")
    assert ref2.count == 5 and ref2.resolution == 24
    np.testing.assert_allclose(ref2.mu, ref.mu, rtol=1e-6, atol=1e-9)

    def calc(src):
        out = tmp_path / "res.json"
        assert fid_cli.main(["calc", "--images", str(src), "--ref", str(tmp_path / "stats.npz"),
                             "--inception", str(weights), "--device", "cpu", "--no-progress",
                             "--json", str(out)]) == 0
        return json.loads(out.read_text())["fid"]
    same = calc(tmp_path / "folder")
    assert abs(same) < 1e-6 * np.trace(ref.sigma) + 1e-6
    assert calc(tmp_path / "other.npz") > 10 * abs(same) + 1e-6
    assert "FID" in capsys.readouterr().out


def test_evaluator_matches_offline_fid(tmp_path):
    """The training-loop evaluator: fixed seeds, FID of its samples (the trainer logs the number)."""
    from pdiff.config import Config
    from pdiff.generate import SampleOptions, iter_uint8
    from pdiff.precond import EDMPrecond
    torch.set_num_threads(1)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(5, 3, 1)

        def forward(self, x, noise_labels, class_labels=None):
            return self.conv(x) + noise_labels.reshape(-1, 1, 1, 1)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = EDMPrecond(Tiny()).train()
    cfg = Config()
    cfg.data.resolution, cfg.network.label_dim, cfg.sample.steps = 16, 0, 3
    net = F.load_inception(random_init=True)
    rng = np.random.default_rng()
    F.save_stats(tmp_path / "ref.npz", rng.normal(size=2048) * 0.1, np.eye(2048) * 1e-3, 50, 16)
    ev = F.FIDEvaluator(tmp_path / "ref.npz", net, num_images=4, batch=3, first_seed=7)
    fid = ev.compute(model, cfg)
    assert model.training  # the caller's mode is restored
    feats = torch.cat([F.inception_features(net, im) for _, im, _ in
                       iter_uint8(model, [7, 8, 9, 10], 4, 16, 3, 0, SampleOptions(cfg.sample), "cpu")])
    ref = F.load_stats(tmp_path / "ref.npz")
    assert fid == pytest.approx(F.frechet_distance_lowrank(feats.numpy(), ref.mu, ref.sigma), rel=1e-6)
    # wrong resolution reference and missing pieces
    cfg.data.resolution = 8
    with pytest.raises(F.FIDError, match="16x16"):
        ev.compute(model, cfg)
    assert F.FIDEvaluator.maybe(tmp_path / "ref.npz", tmp_path / "nope.pth") is None
    assert F.FIDEvaluator.maybe(None, None) is None


def test_seed_sets_and_summary():
    sets = F.seed_sets(100, 5, 3)
    assert sets[0] == [100, 101, 102, 103, 104] and sets[2][-1] == 114
    assert len(set(sum(sets, []))) == 15
    s = F.summarize([3.0, 2.0, 4.0])
    assert s["min"] == 2.0 and s["mean"] == pytest.approx(3.0)


def test_fid_gen_cli_sets(tmp_path, capsys):
    """Sample and score in one go over several seed sets: mean and min reported, set k = seeds
    first + k*num ..., and each set's FID equals scoring that set's images offline."""
    from pdiff.config import load_config
    from pdiff.generate import SampleOptions, iter_uint8
    from pdiff.model import build_model
    from pdiff.snapshot import save_snapshot
    torch.set_num_threads(1)
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = load_config("tiny", ["network.model_channels=16", "network.channel_mult=[1,2]",
                               "network.attn_resolutions=[]", "data.resolution=16", "sample.steps=2"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    snap = save_snapshot(tmp_path / "snap.safetensors", model, cfg, 5)
    net, weights = _random_weights(tmp_path)
    rng = np.random.default_rng()
    F.save_stats(tmp_path / "ref.npz", rng.normal(size=2048) * 0.1, np.eye(2048) * 1e-3, 50, 16)
    F.save_stats(tmp_path / "ref8.npz", rng.normal(size=2048) * 0.1, np.eye(2048) * 1e-3, 50, 8)
    base = ["gen", "--snapshot", str(snap), "--inception", str(weights), "--device", "cpu", "--no-progress",
            "--num", "3", "--sets", "2", "--first-seed", "10", "--batch", "2"]
    assert fid_cli.main(base + ["--ref", str(tmp_path / "ref.npz"), "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["fid"]) == 2 and res["min"] == min(res["fid"])
    assert res["mean"] == pytest.approx(sum(res["fid"]) / 2)
    assert "min" in capsys.readouterr().out
    ref = F.load_stats(tmp_path / "ref.npz")
    feats = torch.cat([F.inception_features(net, im) for _, im, _ in
                       iter_uint8(model, [13, 14, 15], 3, 16, 3, 0, SampleOptions(cfg.sample), "cpu")])
    assert res["fid"][1] == pytest.approx(F.frechet_distance_lowrank(feats.numpy(), ref.mu, ref.sigma), rel=1e-6)
    assert pdiff_cli(["fid", *base, "--ref", str(tmp_path / "ref8.npz")]) == 2
    assert "8x8 images but the images to score are 16x16" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_match_cpu_and_leave_tf32_flags():
    net = F.load_inception(random_init=True)
    imgs = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    cpu = F.inception_features(net, imgs)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    gpu = F.inception_features(net.to("cuda"), imgs.cuda(), chunk=4).cpu()
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)
