"""Power-function EMA and post-hoc reconstruction (EDM2): the profile's formulas against numerical
integration, the tracked averages against their profiles, reconstructions against tracked
averages and against the closed form of a known trajectory, and `pdiff ema` on a trained run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from pdiff.config import load_config
from pdiff.ema import PowerEMA, gamma_to_std, power_beta, save_snapshots, std_to_gamma
from pdiff.model import build_model
from pdiff.posthoc import (PosthocError, parse_stds, power_snapshots, profile_inner_product, reconstruct,
                           solve_coefficients)

SMALL = ["network.model_channels=8", "network.channel_mult=[1,2]", "network.attn_resolutions=[]",
         "network.num_blocks=1", "data.resolution=16", "ema.mode=power"]


def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31, ())))


def profile(t: float, gamma: float):
    """EDM2's power profile at time t, written from its definition (weight ~ tau^gamma on [0, t])."""
    norm = integrate.quad(lambda tau: (tau / t) ** gamma, 0, t)[0]       # tau / t: no overflow at 1e8 images
    return lambda tau: (tau / t) ** gamma / norm if 0 <= tau <= t else 0.0


def test_sigma_rel_of_the_power_profile_by_numerical_integration():
    """sigma_rel is the standard deviation of the profile over [0, t] divided by t (EDM2 section
    3.1), for any t; EDM2's defaults 0.05 and 0.10 are gamma 16.97 and 6.94 (the paper's values)."""
    for gamma in [0.3, 2.0, 6.94, 16.97, 40.0]:
        for t in [1.0, 3.7e4, 2.1e8]:
            p = profile(t, gamma)
            mean = integrate.quad(lambda x: x * p(x), 0, t, points=[t])[0]
            var = integrate.quad(lambda x: (x - mean) ** 2 * p(x), 0, t, points=[t])[0]
            assert gamma_to_std(gamma) == pytest.approx(math.sqrt(var) / t, rel=1e-6)
        assert std_to_gamma(gamma_to_std(gamma)) == pytest.approx(gamma, rel=1e-9)
    assert std_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert std_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in (0.0, -0.1, 0.29, 1.0):
        with pytest.raises(ValueError, match="sigma_rel"):
            std_to_gamma(bad)


def test_tracked_average_puts_the_profile_on_each_step():
    """With steps of uneven image counts (patch steps carry batch R/s images), the weight the power
    EMA gives step i after t images is the integral of the profile over that step's images."""
    g = rng()
    images = np.cumsum(g.choice([8, 16, 32], size=60))             # images seen after each step
    for std in (0.05, 0.1, 0.2):
        gamma = std_to_gamma(std)
        weights = torch.zeros(len(images), dtype=torch.float64)
        ema = PowerEMA(torch.nn.Linear(1, 1), [std])    # a parameter holding one-hot vectors
        avg = torch.nn.Parameter(torch.zeros(len(images), dtype=torch.float64))
        ema.models[0] = torch.nn.ParameterList([avg])
        before = 0
        for i, after in enumerate(images):
            onehot = torch.nn.ParameterList([torch.nn.Parameter(torch.nn.functional.one_hot(
                torch.tensor(i), len(images)).double())])
            ema.update(onehot, before, int(after))
            before = int(after)
        weights = avg.detach().numpy()
        t = float(images[-1])
        p = profile(t, gamma)
        edges = np.concatenate([[0.0], images])
        expect = [integrate.quad(p, a, b)[0] for a, b in zip(edges[:-1], edges[1:])]
        np.testing.assert_allclose(weights, expect, rtol=1e-7, atol=1e-12)
    assert power_beta(5.0, 0, 32) == 0.0            # the first step: the average is the weights


def test_profile_inner_products_by_numerical_integration():
    for t_a, g_a, t_b, g_b in [(1.0, 6.94, 1.0, 16.97), (3e5, 6.94, 8e5, 16.97), (8e5, 2.0, 3e5, 30.0),
                               (5e7, 16.97, 5e7, 16.97), (12.0, 0.5, 7.0, 4.0)]:
        pa, pb = profile(t_a, g_a), profile(t_b, g_b)
        expect = integrate.quad(lambda x: pa(x) * pb(x), 0, min(t_a, t_b), epsabs=0, epsrel=1e-11, limit=200)[0]
        assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(expect, rel=1e-8)
        assert profile_inner_product(t_b, g_b, t_a, g_a) == pytest.approx(expect, rel=1e-8)


def small_cfg(extra=()):
    return load_config("tiny", SMALL + list(extra))


def run_trajectory(tmp_path, cfg, weights_at, snapshot_every: int, steps: int, step_images):
    """Drive a PowerEMA through ``steps`` steps of ``step_images()`` images each, the model's weights
    set to ``weights_at(t0, t1)`` for the step over (t0, t1]; snapshots as the trainer writes them.
    Returns the run folder and the images seen of every snapshot."""
    model = build_model(cfg)
    ema = PowerEMA(model, cfg.ema.stds)
    run = tmp_path / "run"
    before, times = 0, []
    for i in range(steps):
        after = before + step_images()
        with torch.no_grad():
            for p, v in zip(model.parameters(), weights_at(before, after)):
                p.copy_(v)
        ema.update(model, before, after)
        if after // snapshot_every > before // snapshot_every or i == steps - 1:
            save_snapshots(ema, run / "snapshots", cfg, after)
            times.append(after)
        before = after
    return run, times


def test_reconstructing_a_tracked_std_gives_the_tracked_average(tmp_path):
    """Random weights at every step: the reconstruction of 0.05 and 0.10 at a snapshot time is that
    snapshot (to float32 rounding), and another width is something else."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = small_cfg()
    shapes = [p.shape for p in build_model(cfg).parameters()]
    g = rng()
    run, times = run_trajectory(tmp_path, cfg, lambda a, b: [torch.randn(s) * 0.1 + 1.0 for s in shapes],
                                snapshot_every=256, steps=120, step_images=lambda: int(g.choice([8, 16, 32])))
    snaps = power_snapshots(run)
    assert {s.std for s in snaps} == {0.05, 0.1} and sorted({s.images_seen for s in snaps}) == times
    from safetensors.torch import load_file
    for at in (times[len(times) // 2], times[-1]):
        for std in (0.05, 0.1):
            rec = reconstruct(snaps, std, at)
            (tracked,) = [s for s in snaps if s.images_seen == at and s.std == std]
            want = load_file(str(tracked.path))
            assert rec.images_seen == at and set(rec.state) == set(want)
            for k, v in want.items():
                torch.testing.assert_close(rec.state[k], v, rtol=0, atol=2e-6, msg=k)
    other = reconstruct(snaps, 0.07).state
    assert max((other[k] - want[k]).abs().max() for k in want) > 1e-3


@pytest.mark.slow
def test_reconstruction_of_a_polynomial_trajectory_matches_the_closed_form(tmp_path):
    """Weights theta(tau) = a + b (tau/T) + c (tau/T)^2 per element: the power average of width
    gamma at t is a + b (g+1)/(g+2) (t/T) + c (g+1)/(g+3) (t/T)^2. Reconstructed for widths that
    were not tracked (inside and outside [0.05, 0.10]) it matches that to the discretisation error."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = small_cfg()
    shapes = [p.shape for p in build_model(cfg).parameters()]
    a, b, c = ([torch.randn(s) for s in shapes] for _ in range(3))
    total = 6000.0

    def weights_at(t0, t1):       # the trajectory at the middle of the step's images
        u = 0.5 * (t0 + t1) / total
        return [ai + bi * u + ci * u * u for ai, bi, ci in zip(a, b, c)]
    run, times = run_trajectory(tmp_path, cfg, weights_at, snapshot_every=200, steps=600, step_images=lambda: 10)
    snaps = power_snapshots(run)
    for std, at in [(0.07, times[-1]), (0.15, times[-1]), (0.03, times[-1]), (0.07, times[len(times) // 2])]:
        rec = reconstruct(snaps, std, at)
        gamma, u = std_to_gamma(std), at / total
        names = [n for n, _ in build_model(cfg).named_parameters()]
        for name, ai, bi, ci in zip(names, a, b, c):
            expect = ai + bi * (gamma + 1) / (gamma + 2) * u + ci * (gamma + 1) / (gamma + 3) * u * u
            torch.testing.assert_close(rec.state[name], expect, rtol=0, atol=5e-4, msg=f"{name} std {std}")


def test_coefficients_sum_to_one_and_select_a_tracked_profile():
    t = np.array([100.0, 100.0, 200.0, 200.0, 300.0, 300.0])
    g = np.array([std_to_gamma(s) for s in (0.05, 0.1) * 3])
    c = solve_coefficients(t, g, 300.0, g[1])
    np.testing.assert_allclose(c, np.eye(6)[5] * 0 + np.eye(6)[5], atol=1e-8)
    c = solve_coefficients(t, g, 200.0, std_to_gamma(0.07))
    assert c.sum() == pytest.approx(1.0)


def test_parse_stds():
    assert parse_stds("0.03:0.15:0.01") == pytest.approx([0.03 + 0.01 * i for i in range(13)])
    assert parse_stds("0.1,0.05") == [0.05, 0.1]
    for bad in ("0.1:0.05:0.01", "a", "0.3", "0.05:0.1:0"):
        with pytest.raises(PosthocError, match="--stds"):
            parse_stds(bad)


def test_config_checks_ema_stds():
    from pdiff.config import ConfigError
    assert small_cfg().ema.stds == [0.05, 0.1]
    for bad in ("[]", "[0.05, 0.3]", "[0.1, 0.1]"):
        with pytest.raises(ConfigError, match="ema.stds"):
            small_cfg([f"ema.stds={bad}"])
    with pytest.raises(ConfigError, match="ema.mode"):
        small_cfg(["ema.mode=median"])


# ---------------------------------------------------------------------------------------------
# A run with ema.mode=power and `pdiff ema`

@pytest.fixture(scope="module")
def power_run(tmp_path_factory, digits_shards):
    """A short training run on digits with ema.mode=power and a snapshot every 64 images."""
    from pdiff.train import train
    run = tmp_path_factory.mktemp("power") / "run"
    cfg = load_config("tiny", [*SMALL, "data.channels=1", f"data.path={digits_shards}", "data.backend=torch",
                               "data.workers=0", "train.batch=8", "train.duration_images=256",
                               "train.log_every_images=64", "train.ckpt_every_images=256",
                               "train.snapshot_every_images=64", "train.sample_every_images=100000",
                               f"train.run_dir={run}", "sample.steps=2", "optim.warmup_images=32"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(cfg, "cpu") == 0
    finally:
        torch.set_num_threads(before)
    return run, cfg


def test_power_run_writes_snapshots_with_their_profile(power_run):
    from pdiff.snapshot import load_checkpoint, load_snapshot, read_metadata
    run, cfg = power_run
    files = sorted((run / "snapshots").glob("*.safetensors"))
    times = sorted({int(f.name.split("-")[1].split(".")[0]) for f in files})
    assert len(times) >= 4 and times[-1] >= 256 and len(files) == 2 * len(times)
    for f in files:
        meta = read_metadata(f)
        std = float(meta["ema_std"])
        assert f.name == f"ema-{int(meta['images_seen']):012d}-{std:.3f}.safetensors"
        assert meta["ema_mode"] == "power" and float(meta["ema_gamma"]) == pytest.approx(std_to_gamma(std))
    # the checkpoint holds both averages; its EMA weights (pdiff sample --checkpoint) are the first one's
    model, _, _ = load_checkpoint(run)
    first, _, _ = load_snapshot(run / "snapshots" / f"ema-{times[-1]:012d}-0.050.safetensors")
    second, _, _ = load_snapshot(run / "snapshots" / f"ema-{times[-1]:012d}-0.100.safetensors")
    for k, v in first.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert any(not torch.equal(second.state_dict()[k], v) for k, v in first.state_dict().items())


def test_ema_reconstruct_cli_writes_a_snapshot_sample_takes(power_run, tmp_path, capsys):
    from pdiff.cli import main
    from pdiff.snapshot import load_snapshot
    run, _ = power_run
    times = sorted(s.images_seen for s in power_snapshots(run))
    assert main(["ema", "reconstruct", "--run", str(run), "--std", "0.07"]) == 0
    out = run / "posthoc" / f"ema-{times[-1]:012d}-0.070.safetensors"
    assert str(out) in capsys.readouterr().out
    model, cfg, meta = load_snapshot(out)
    assert meta["ema_mode"] == "posthoc" and float(meta["ema_std"]) == 0.07 and meta["images_seen"] == str(times[-1])
    sources = json.loads(meta["ema_posthoc_sources"])
    assert len(sources) == 2 * len(set(times)) and sum(s["coefficient"] for s in sources) == pytest.approx(1)
    assert main(["sample", "--snapshot", str(out), "--seeds", "0-1", "--npz", str(tmp_path / "s.npz"),
                 "--no-progress", "--device", "cpu"]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 16, 16, 1)
    # a tracked width at an earlier snapshot time is that snapshot
    mid = times[len(times) // 2]
    assert main(["ema", "reconstruct", "--run", str(run), "--std", "0.1", "--at", str(mid),
                 "--out", str(tmp_path / "mid.safetensors")]) == 0
    rec, _, _ = load_snapshot(tmp_path / "mid.safetensors")
    tracked, _, _ = load_snapshot(run / "snapshots" / f"ema-{mid:012d}-0.100.safetensors")
    for k, v in tracked.state_dict().items():
        torch.testing.assert_close(rec.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_ema_cli_errors(power_run, tmp_path, capsys):
    from pdiff.cli import main
    run, _ = power_run
    assert main(["ema", "reconstruct", "--run", str(run), "--std", "0.07", "--at", "5"]) == 2
    assert "no snapshot was taken at 5 images" in capsys.readouterr().err
    assert main(["ema", "reconstruct", "--run", str(run), "--std", "0.4"]) == 2
    assert "sigma_rel" in capsys.readouterr().err
    (tmp_path / "plain" / "snapshots").mkdir(parents=True)
    assert main(["ema", "reconstruct", "--run", str(tmp_path / "plain"), "--std", "0.07"]) == 2
    assert "ema.mode=power" in capsys.readouterr().err


def test_resume_refuses_another_ema_mode(power_run, tmp_path):
    import shutil
    from pdiff.train import train
    run, cfg = power_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    from pdiff.bench import variant
    from pdiff.checkpoint import ResumeError
    with pytest.raises(ResumeError, match="ema.mode=power"):
        train(variant(cfg, [f"train.run_dir={copy}", "ema.mode=halflife", "train.duration_images=512"]), "cpu")
    with pytest.raises(ResumeError, match=r"ema.stds \[0.05, 0.1\]"):
        train(variant(cfg, [f"train.run_dir={copy}", "ema.stds=[0.05,0.2]", "train.duration_images=512"]), "cpu")


@pytest.mark.slow
def test_ema_sweep_scores_each_std_and_keeps_the_best(power_run, tmp_path, capsys):
    """With a random-weight Inception (the plumbing, not the numbers): one FID per sigma_rel, the
    best one's snapshot written and the JSON naming it."""
    from pdiff import fid as F
    from pdiff.cli import main
    run, _ = power_run
    weights = tmp_path / "inception.pth"
    torch.save(F.load_inception(random_init=True).state_dict(), weights)
    net = F.load_inception(weights)
    real = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    stats = F.FeatureStats()
    stats.update(F.inception_features(net, real))
    mu, sigma = stats.mean_cov()
    F.save_stats(tmp_path / "ref.npz", mu, sigma, stats.count, 16)
    rc = main(["ema", "sweep", "--run", str(run), "--stds", "0.05:0.09:0.02", "--fid-ref", str(tmp_path / "ref.npz"),
               "--inception", str(weights), "--num", "3", "--batch", "3", "--steps", "2", "--device", "cpu",
               "--no-progress", "--json", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "best.safetensors")])
    assert rc == 0
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["std"] for r in res["results"]] == pytest.approx([0.05, 0.07, 0.09])
    assert all(np.isfinite(r["fid"]) for r in res["results"])
    assert res["best"]["fid"] == min(r["fid"] for r in res["results"])
    from pdiff.snapshot import read_metadata
    assert float(read_metadata(tmp_path / "best.safetensors")["ema_std"]) == pytest.approx(res["best"]["std"])
