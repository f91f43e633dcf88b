"""`pdiff bench quality`: the arms, the cost accounting, the reading of the curves (crossovers, the
table at equal cost), the budget's control loop with a stubbed trainer, the learned-feature
metric on real digits, and `--quick` end to end (that it runs and writes what it promises, not
what it finds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pdiff.bench import BenchError
from pdiff.bench.quality import (Arm, Budget, FlopCounter, chunk_cost, crossovers, interpolate, parse_patch_sets,
                                 patch_probs, quality_arms, run_arm, summarize)
from pdiff.config import load_config
from pdiff.schedule import PatchSchedule, StochasticSchedule

TINY = ["network.model_channels=8", "network.channel_mult=[1,2]", "network.num_blocks=1",
        "network.attn_resolutions=[8]", "data.resolution=16", "train.batch=4", "data.backend=torch",
        "data.workers=0", "sample.steps=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31, ())))


def test_patch_sets_probs_and_arms():
    assert parse_patch_sets("R/4,R/2,R;R/2,R", 64) == [[16, 32, 64], [32, 64]]
    assert parse_patch_sets("8, 16,32", 32) == [[8, 16, 32]]
    with pytest.raises(BenchError, match="full size"):
        parse_patch_sets("R/4,R/2", 64)
    with pytest.raises(BenchError, match="not a size"):
        parse_patch_sets("R/4,x,R", 64)
    p = float(rng().uniform(0.1, 0.9))
    assert patch_probs([16, 32, 64], 64, p) == pytest.approx([0.4 * (1 - p), 0.6 * (1 - p), p])   # the paper's
    assert patch_probs([32, 64], 64, p) == pytest.approx([1 - p, p])
    cfg = load_config("tiny", TINY + ["patch.real_p=0.5"])
    arms = quality_arms(cfg, [[4, 8, 16], [8, 16]], [0.25, 0.5])
    # the base is the config's schedule: pdiff's default for 16 px, {R/2, R} (docs/patch_defaults.md)
    assert [a.name for a in arms] == ["full (p=1)", "{8,16} p=0.5", "{4,8,16} p=0.5", "{8,16} p=0.25"]
    from pdiff.bench import variant
    for arm, (sizes, probs) in zip(arms[1:], [([8, 16], [0.5, 0.5]), ([4, 8, 16], [0.2, 0.3, 0.5]),
                                              ([8, 16], [0.75, 0.25])]):
        sched = PatchSchedule.from_config(variant(cfg, arm.overrides))
        assert sched.sizes == sizes and sched.probs == pytest.approx(probs), arm.name
    assert PatchSchedule.from_config(variant(cfg, arms[0].overrides)).sizes == [16]
    from pdiff.bench.quality import depends_on_duration
    assert not any(depends_on_duration(variant(cfg, a.overrides)) for a in arms)
    assert depends_on_duration(variant(cfg, ["patch.mode=progressive"]))
    # explicit probs: the base arm's p is their full-size entry, whatever patch.real_p says
    full = float(rng().choice([0.3, 0.7]))
    mine = load_config("tiny", TINY + ["patch.sizes=[8,16]", f"patch.probs=[{1 - full},{full}]"])
    base = quality_arms(mine)[1]
    from pdiff.config import check_resolution_dependent
    check_resolution_dependent(variant(mine, base.overrides), "<test>")
    assert base.name == f"{{8,16}} p={full:g}"


def test_flop_counter_sums_the_steps_the_schedule_takes():
    sched = StochasticSchedule(16, 4, 0.5, seed=int(rng().integers(1 << 30)))
    per_image = {4: 1.0, 8: 10.0, 16: 100.0}
    counter = FlopCounter(sched, per_image)
    steps = list(sched.steps(0, until=2000))
    images = np.cumsum([st.batch for st in steps])
    flops = np.cumsum([st.batch * per_image[st.patch_size] for st in steps])
    for i in sorted(rng().choice(len(steps), 5, replace=False)):
        assert counter.at(int(images[i])) == pytest.approx(flops[i])
    fresh = FlopCounter(sched, per_image)
    goal = float(flops[len(steps) // 2]) - 0.5
    assert fresh.images_for(goal) == images[np.searchsorted(flops, goal)]
    with pytest.raises(BenchError, match="step boundary"):
        FlopCounter(sched, per_image).at(int(images[3]) + 1)


def test_chunk_cost_reads_the_chunk_rows():
    rows = [{"images_seen": 100, "images_per_s": 50.0, "cpu_seconds": 1.5},      # an earlier chunk
            {"images_seen": 160, "images_per_s": 30.0, "cpu_seconds": 2.5},
            {"images_seen": 220, "images_per_s": 60.0, "cpu_seconds": 0.75}]
    assert chunk_cost(rows, 100, "cpu") == (220, 3.25, 3.0, 3.25)
    assert chunk_cost(rows, 100, "cuda") == (220, 3.0, 3.0, 3.25)


def line(xs, a, b):
    return [{"hours": x, "flops": 10 * x, "images": int(100 * x), "metric": a + b * x} for x in xs]


def test_crossovers_of_two_lines_and_the_table_at_equal_cost():
    g = rng()
    x_cross = float(g.uniform(2, 4))
    # full images: 10 - 1 x; patches: better early, flatter: crossing at x_cross
    full = line([1, 2, 3, 4, 5, 6], 10.0, -1.0)
    slope = -0.4
    patch = line([0.5, 1.5, 2.5, 3.5, 4.5, 5.5], 10 - x_cross - slope * x_cross, slope)
    (c,) = crossovers(patch, full, "hours")
    assert c["hours"] == pytest.approx(x_cross) and c["better_after"] == "b"
    assert c["metric"] == pytest.approx(10 - x_cross)
    (c,) = crossovers(patch, full, "flops")
    assert c["flops"] == pytest.approx(10 * x_cross)
    assert crossovers(full, line([1, 6], 20.0, 0.0), "hours") == []
    assert interpolate(full, "hours", 0.5) is None and interpolate(full, "hours", 2.5) == pytest.approx(7.5)
    res = [{"name": "full", "points": full}, {"name": "patch", "points": patch}]
    s = summarize(res, Budget("hours", 6.0), 3)
    assert [r["hours"] for r in s["table"]] == [2.0, 4.0, 6.0]
    assert s["table"][1]["full"] == pytest.approx(6.0) and s["table"][2]["patch"] is None   # patch stopped at 5.5
    near = summarize([{"name": "full", "points": line([0.45, 0.98, 1.5], 3.0, 0.0)}], Budget("hours", 1.5), 3)
    assert [r["full"] for r in near["table"]] == [3.0, 3.0, 3.0]       # within a tenth of a step of a point
    assert interpolate(full, "hours", 0.85, 0.2) == pytest.approx(9.0) and interpolate(full, "hours", 0.7, 0.2) is None
    (c,) = s["crossovers_vs_full"]["patch"]["hours"]
    assert c["better_after"] == "full"
    assert s["best_at_budget"] == "full" and s["final_metric"]["full"] == pytest.approx(4.0)


def test_hours_budget_loop_probes_then_lands_on_the_points(tmp_path, monkeypatch):
    """A stubbed trainer at a known images per device-second: a probe chunk, then one chunk per
    evaluation point, each ending at its share of the budget; the metric is scored once per point."""
    import pdiff.bench.quality
    cfg = load_config("tiny", TINY + [f"data.path={tmp_path}"])
    rate = float(rng().uniform(50, 200))          # images per CPU second
    log: list[dict] = []

    def runner(run_cfg, device):
        target = run_cfg.train.duration_images
        start = log[-1]["images_seen"] if log else 0
        sched = PatchSchedule.from_config(run_cfg)
        end = start
        for st in sched.steps(start):
            end += st.batch
            if end >= target:
                break
        log.append({"images_seen": end, "images_per_s": 2 * rate, "cpu_seconds": (end - start) / rate})
        return list(log)
    monkeypatch.setattr(pdiff.bench.quality, "load_checkpoint", lambda run_dir, device: (None, cfg, {}))
    scored = []

    class Metric:
        def score(self, model, run_cfg):
            scored.append(log[-1]["images_seen"])
            return 1.0 / len(scored)
    budget = Budget("hours", 600 * 4 / rate / 3600)       # 600 steps of 4 images at the full size
    out = run_arm(cfg, Arm("full (p=1)", ["patch.mode=full"]), torch.device("cpu"), tmp_path, budget, 3, Metric(),
                  runner=runner)
    hours = [p["hours"] for p in out["points"]]
    assert len(out["points"]) == 3 and len(scored) == 3 and len(log) == 4      # probe + 3 chunks
    assert hours == pytest.approx([budget.value / 3, 2 * budget.value / 3, budget.value], rel=0.02)
    assert [p["wall_seconds"] for p in out["points"]] == pytest.approx([h * 3600 / 2 for h in hours])
    assert out["points"][-1]["flops"] > out["points"][0]["flops"] > 0


@pytest.mark.slow
def test_learned_feature_distance_separates_digits_from_other_images(digits_shards):
    """The classifier's features: held-out digits are near the training digits, smoothed noise
    and digits shifted off-centre are far."""
    from pdiff.bench.features import feature_stats, load_images, to_nchw, train_feature_net
    from pdiff.fid import frechet_distance
    images, labels = load_images(digits_shards)
    assert images.shape == (512, 16, 16, 1) and labels.shape == (512,) and labels.max() == 9
    net = train_feature_net(images[:384], labels[:384], steps=150, seed=int(rng().integers(1 << 20)))
    assert net.kind == "classifier"
    mu, sigma = feature_stats(net, to_nchw(images[:384]))

    def fd(imgs):
        m, s = feature_stats(net, to_nchw(imgs))
        return frechet_distance(m, s, mu, sigma)
    held_out = fd(images[384:])
    g = rng()
    noise = torch.nn.functional.avg_pool2d(
        torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(int(g.integers(1 << 30)))), 3, 1, 1)
    noise = (noise * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    shifted = np.roll(images[384:], 5, axis=2)
    assert held_out < 0.5 * fd(noise) and held_out < 0.5 * fd(shifted), (held_out, fd(noise), fd(shifted))


def test_denoising_features_without_labels(random_shards):
    from pdiff.bench.features import data_features
    feats = data_features(random_shards, steps=3)
    assert feats.net.kind == "denoising autoencoder" and feats.mu.shape == (64,) and feats.count == 40
    assert "denoising autoencoder" in feats.description


@pytest.mark.slow
def test_quick_cli_writes_table_json_and_plot(digits_shards, tmp_path, capsys):
    from PIL import Image
    from pdiff.cli import main
    out = tmp_path / "quality.json"
    rc = main(["bench", "quality", "--config", "tiny", *TINY, "data.channels=1", f"data.path={digits_shards}",
               "--quick", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "NOT comparable with FID" in text and "best at the end of the budget" in text
    payload = json.loads(out.read_text())
    res = payload["results"]
    assert payload["kind"] == "quality" and payload["machine"]["cpu"]
    assert [a["name"] for a in res["arms"]] == ["full (p=1)", "{8,16} p=0.5", "{4,8,16} p=0.5", "{8,16} p=0.25"]
    assert res["metric"]["comparable_to_fid"] is False and "classifier" in res["metric"]["description"]
    for arm in res["arms"]:
        assert len(arm["points"]) == 2 and all(np.isfinite(p["metric"]) and p["flops"] > 0 for p in arm["points"])
        assert arm["points"][-1]["images"] >= res["budget"]["value"]
    assert set(res["crossovers_vs_full"]) == {a["name"] for a in res["arms"][1:]}
    assert len(res["table"]) == 2 and res["best_at_budget"] in res["final_metric"]
    with Image.open(out.with_suffix(".png")) as im:
        assert im.format == "PNG" and im.width > 1000


@pytest.mark.slow
def test_quick_cli_with_inception_weights_is_fid(digits_shards, tmp_path, capsys):
    """With --inception and --fid-ref the metric is FID (random-weight Inception: the plumbing)."""
    from pdiff import fid as F
    from pdiff.cli import main
    weights = tmp_path / "inception.pth"
    torch.save(F.load_inception(random_init=True).state_dict(), weights)
    stats = F.FeatureStats()
    stats.update(F.inception_features(F.load_inception(weights),
                                      torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)))
    mu, sigma = stats.mean_cov()
    F.save_stats(tmp_path / "ref.npz", mu, sigma, stats.count, 16)
    out = tmp_path / "q.json"
    rc = main(["bench", "quality", "--config", "tiny", *TINY, "data.channels=1", f"data.path={digits_shards}",
               "--quick", "--device", "cpu", "--out", str(out), "--inception", str(weights),
               "--fid-ref", str(tmp_path / "ref.npz"),
               "--patch-sets", "R/2,R", "--p-values", "", "--eval-images", "2", "--evals", "1"])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    assert res["metric"]["comparable_to_fid"] is True and res["metric"]["key"] == "fid"
    assert [a["name"] for a in res["arms"]] == ["full (p=1)", "{8,16} p=0.5"]
    assert all(len(a["points"]) == 1 for a in res["arms"])


def test_cli_needs_a_budget(digits_shards, capsys):
    from pdiff.cli import main
    assert main(["bench", "quality", "--config", "tiny", *TINY, f"data.path={digits_shards}", "--device", "cpu"]) == 1
    assert "give the budget per arm" in capsys.readouterr().err
