"""`pdiff bench`, the benchmark arithmetic, the results table (docs/benchmarks.md) and the GPU suite's plumbing.

The arithmetic is checked with a fake clock (per-size step costs) and a stubbed training run (log
rows made from known per-patch costs); the real quick runs check that every command runs on the CPU
and writes the JSON fields the issue names. Tiny network (8 channels, 16x16), data made on the fly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pdiff import bench
from pdiff.config import load_config
from pdiff.schedule import FullImageSchedule, PatchSchedule, StochasticSchedule
from pdiff.tools import bench as bench_cli
from pdiff.train import crossed

REPO = Path(__file__).resolve().parents[1]
TINY = ["network.model_channels=8", "network.channel_mult=[1,2]", "network.num_blocks=1",
        "network.attn_resolutions=[8]", "data.resolution=16", "train.batch=4", "data.backend=torch",
        "data.workers=0", "sample.steps=2", "patch.sizes=[4,8,16]", "patch.probs=[0.2,0.3,0.5]"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Arithmetic

class FakeClock:
    def __init__(self):
        self.now = 1000.0 * np.random.default_rng().random()

    def __call__(self):
        return self.now


def test_step_costs_and_schedule_ratio_with_fake_clock():
    rng = np.random.default_rng()
    r, batch = 32, int(rng.integers(2, 9))
    probs = rng.dirichlet([1, 1, 1])
    sched = StochasticSchedule(r, batch, sizes=[8, 16, 32], probs=list(probs))
    per_patch = {s: float(rng.uniform(1e-4, 1e-2)) for s in (8, 16, 32)}   # seconds per patch
    clock = FakeClock()
    calls = {s: 0 for s in per_patch}

    def make_step(s):
        n = sched.batch_for(s)

        def step():
            calls[s] += 1
            clock.now += n * per_patch[s] * (1 + 0.5 * (calls[s] == 1))   # the warm-up call is slower
        return step, n

    per_size = bench.time_sizes(make_step, [8, 16, 32], repeats=3, warmup=1, clock=clock)
    assert calls == {8: 4, 16: 4, 32: 4}
    for s, v in per_size.items():
        n = sched.batch_for(s)
        assert v["patches"] == n
        assert v["ms_per_image"] == pytest.approx(1e3 * per_patch[s])       # warm-up excluded
        assert v["ms_per_step"] == pytest.approx(1e3 * per_patch[s] * n)
        assert v["images_per_s"] == pytest.approx(1 / per_patch[s])
    fig = bench.schedule_figures(sched, per_size)
    m = {s: r // s for s in per_patch}
    p = dict(zip(sched.sizes, sched.probs))
    want = sum(p[s] * m[s] * per_patch[s] for s in p) / sum(p[s] * m[s] for s in p) / per_patch[r]
    assert fig["cost_per_image_vs_full"] == pytest.approx(want)
    assert fig["speedup_per_image_vs_full"] == pytest.approx(1 / want)
    # images/s of the schedule = expected images per step / expected seconds per step
    ips = sum(p[s] * batch * m[s] for s in p) / sum(p[s] * batch * m[s] * per_patch[s] for s in p)
    assert fig["images_per_s"] == pytest.approx(ips)
    assert fig["ms_per_step"] == pytest.approx(1e3 * sum(p[s] * batch * m[s] * per_patch[s] for s in p))
    # FLOPs per patch that make every size run at the same FLOP rate: the schedule runs at it too.
    rate, peak = float(rng.uniform(1e9, 1e14)), float(rng.uniform(100, 1000))
    bench.add_flop_figures(per_size, fig, sched, {s: rate * per_patch[s] for s in per_patch}, peak)
    for v in [*per_size.values(), fig]:
        assert v["tflop_per_s"] == pytest.approx(rate / 1e12) and v["mfu"] == pytest.approx(rate / 1e12 / peak)
    bench.add_flop_figures(per_size, None, sched, {s: 1.0 for s in per_patch}, None)
    assert all(v["mfu"] is None and v["tflop_per_s"] == pytest.approx(v["images_per_s"] / 1e12)
               for v in per_size.values())


def fake_training(per_patch: dict[int, float], wait: float):
    """A stand-in for run_training: walks the run's schedule with the trainer's logging rule and
    writes the rows it would log if a patch of size s took per_patch[s] seconds and every step
    waited ``wait`` seconds for data."""
    runs = []

    def runner(cfg, device):
        sched, t = PatchSchedule.from_config(cfg), cfg.train
        rows, images, secs, waited, n, flops = [], 0, 0.0, 0.0, 0, 0
        while images < t.duration_images:
            st = sched.step_at(images)
            secs += st.batch * per_patch[st.patch_size] + wait
            waited += wait
            before, images = images, images + st.batch
            n += st.batch
            flops += st.batch * st.patch_size ** 2        # FLOPs of a patch: its area (any known rule does)
            if crossed(before, images, t.log_every_images) or images >= t.duration_images:
                rows.append({"images_seen": images, "images_per_s": n / secs, "ms_per_image": 1e3 * secs / n,
                             "data_wait_share": waited / secs, "loss": 1.0, "peak_memory_gb": 0.5,
                             "tflop_per_s": flops / secs / 1e12, "mfu": flops / secs / 1e12 / 100.0})
                secs, waited, n, flops = 0.0, 0.0, 0, 0
        runs.append(cfg)
        return rows
    return runner, runs


def test_compare_ratio_from_two_stubbed_runs(tmp_path):
    rng = np.random.default_rng()
    # Disjoint ranges: a smaller patch is always cheaper per image than a larger one.
    per_patch = {4: float(rng.uniform(1e-4, 3e-4)), 8: float(rng.uniform(3e-4, 9e-4)),
                 16: float(rng.uniform(1e-3, 5e-3))}
    wait = float(rng.uniform(0, 1e-3))
    runner, runs = fake_training(per_patch, wait)
    cfg = load_config("tiny", TINY + ["data.path=unused", f"train.seed={int(rng.integers(1000))}"])
    seen = []
    res = bench.compare_train(cfg, torch.device("cpu"), tmp_path, intervals=4, interval_images=48,
                              runner=runner, on_result=lambda name, fig: seen.append(name))
    assert seen == ["full", "patch"]
    assert [c.patch.mode for c in runs] == ["full", "stochastic"]
    assert all(c.train.batch == cfg.train.batch and c.train.duration_images == 5 * 48 for c in runs)
    assert runs[0].train.run_dir != runs[1].train.run_dir

    def measured(run_cfg):            # the measured intervals: everything after the first log row
        sched = PatchSchedule.from_config(run_cfg)
        steps = list(sched.steps(0, until=run_cfg.train.duration_images))
        first = next(i for i, st in enumerate(steps) if crossed(st.images_seen, st.images_seen + st.batch, 48))
        return steps[first + 1:]

    def expected(run_cfg):
        rest = measured(run_cfg)
        secs = sum(st.batch * per_patch[st.patch_size] + wait for st in rest)
        return secs, sum(st.batch for st in rest), len(rest), sum(st.batch * st.patch_size ** 2 for st in rest)

    for name, run_cfg in zip(("full", "patch"), runs):
        secs, images, steps, flops = expected(run_cfg)
        got = res[name]
        assert got["images"] == images and got["steps"] == steps
        assert (got["tflop_per_s"] == pytest.approx(flops / secs / 1e12)
                and got["mfu"] == pytest.approx(got["tflop_per_s"] / 100))
        assert got["ms_per_image"] == pytest.approx(1e3 * secs / images)
        assert got["ms_per_step"] == pytest.approx(1e3 * secs / steps)
        assert got["data_wait_share"] == pytest.approx(wait * steps / secs)
    full_secs, full_images, _, _ = expected(runs[0])
    patch_secs, patch_images, _, _ = expected(runs[1])
    ratio = (patch_secs / patch_images) / (full_secs / full_images)
    assert res["comparison"]["cost_per_image_vs_full"] == pytest.approx(ratio)
    assert res["comparison"]["speedup_per_image_vs_full"] == pytest.approx(1 / ratio)
    if any(st.patch_size < 16 for st in measured(runs[1])):
        assert ratio < 1      # patches of 4 and 8 are cheaper per image, and their steps wait no longer

    # The fit recovers each size's step cost (exactly linear here), so the expected-mix ratio is
    # the schedule's formula, whatever mix this short run drew.
    sched = PatchSchedule.from_config(runs[1])
    rows, current = [], {s: 0 for s in sched.sizes}       # the trainer's intervals, step counts per size
    for st in sched.steps(0, until=240):
        current[st.patch_size] += 1
        if crossed(st.images_seen, st.images_seen + st.batch, 48) or st.images_seen + st.batch >= 240:
            rows.append([current[s] for s in sched.sizes])
            current = {s: 0 for s in sched.sizes}
    counts = np.array(rows[1:])
    c = res["comparison"]["cost_per_image_vs_full_expected_mix"]
    if np.linalg.matrix_rank(counts) == 3:
        p, b = dict(zip(sched.sizes, sched.probs)), {s: sched.batch_for(s) for s in sched.sizes}
        step = {s: b[s] * per_patch[s] + wait for s in b}
        want = (sum(p[s] * step[s] for s in p) / sum(p[s] * b[s] for s in p)) / (step[16] / b[16])
        assert c == pytest.approx(want)
        got = res["patch"]["expected_mix"]["ms_per_step_by_patch_size"]
        assert {s: got[s] for s in b} == pytest.approx({s: 1e3 * step[s] for s in b})
    else:
        assert c is None


def test_summarize_log_needs_measured_intervals():
    sched = FullImageSchedule(16, 4)
    with pytest.raises(bench.BenchError, match="nothing left to measure"):
        bench.summarize_log([{"images_seen": 16, "images_per_s": 100.0, "data_wait_share": 0.0}], sched)


def test_overrides_make_a_measurement_run(tmp_path):
    cfg = load_config("tiny", TINY + ["data.path=x"])
    run = bench.variant(cfg, bench.measuring_overrides(tmp_path / "r", 32, intervals=3, wall_budget_s=9))
    assert run.train.duration_images == 4 * 32 and run.train.log_every_images == 32
    assert run.train.ckpt_every_images > 10 ** 12 and run.train.sample_every_images > 10 ** 12
    assert run.train.wall_budget_s == 9 and run.train.run_dir == str(tmp_path / "r")
    assert cfg.train.log_every_images != 32            # the original config is left alone
    with pytest.raises(ValueError, match="patch.mode"):
        bench.variant(cfg, ["patch.mode=sideways"])


# ---------------------------------------------------------------------------------------------
# Real quick runs on the CPU

MACHINE_FIELDS = {"cpu", "cores", "gpu", "gpu_memory_gb", "versions", "date", "host"}


@pytest.fixture(scope="module")
def quick_results(random_shards, tmp_path_factory):
    from pdiff.cli import main as cli           # through the `pdiff` dispatch table
    out = tmp_path_factory.mktemp("benchout")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = {}
    try:
        for kind, extra in [("data", []), ("step", []), ("train", ["--compare"]), ("sample", [])]:
            path = out / f"{kind}.json"
            rc = cli(["bench", kind, "--config", "tiny", *TINY, f"data.path={random_shards}", "--quick",
                      "--device", "cpu", "--out", str(path), *extra])
            assert rc == 0, kind
            paths[kind] = path
    finally:
        torch.set_num_threads(before)
    return {k: json.loads(p.read_text()) for k, p in paths.items()}, out


def test_quick_runs_write_every_field(quick_results):
    res, _ = quick_results
    for kind, payload in res.items():
        assert payload["kind"] == kind and payload["quick"] is True
        assert MACHINE_FIELDS <= set(payload["machine"]), kind
        assert payload["machine"]["cores"] >= 1 and payload["machine"]["cpu"]
        assert {"python", "torch", "triton", "numpy", "dali"} <= set(payload["machine"]["versions"])
    data = res["data"]["results"]
    assert set(data["results"]) == {"s=4", "s=8", "s=16", "schedule"}
    for v in data["results"].values():
        assert v["patches_per_s"] > 0 and v["images_per_s"] > 0 and v["ms_per_step"] > 0
    assert data["results"]["s=4"]["patches_per_step"] == 16 and data["backend"] == "torch"

    step = res["step"]["results"]
    assert set(step["per_patch_size"]) == {"4", "8", "16"}
    for s, v in step["per_patch_size"].items():
        assert v["patches"] == 4 * 16 // int(s) and v["images_per_s"] > 0
    sc = step["schedule"]
    ms = {int(s): v["ms_per_image"] for s, v in step["per_patch_size"].items()}
    sched = StochasticSchedule(16, 4, sizes=[4, 8, 16], probs=[0.2, 0.3, 0.5])
    assert sc["cost_per_image_vs_full"] == pytest.approx(sched.expected_cost_ratio(ms))
    assert sc["images_per_s"] == pytest.approx(1e3 / (sc["cost_per_image_vs_full"] * ms[16]))
    assert 0 < step["flop_model"]["cost_per_image_vs_full"] < 1
    for s, v in step["per_patch_size"].items():          # TFLOP/s from the FLOP model; MFU n/a on a CPU
        gflops = step["flop_model"]["train_gflops_per_image"][s]
        assert v["tflop_per_s"] == pytest.approx(gflops * v["images_per_s"] / 1e3) and v["mfu"] is None
    assert sc["tflop_per_s"] > 0 and sc["mfu"] is None and step["card"] is None

    train = res["train"]["results"]
    for run in ("full", "patch"):
        v = train[run]
        assert v["images_per_s"] > 0 and 0 <= v["data_wait_share"] < 1 and v["intervals"] >= 1
        assert v["ms_per_image"] == pytest.approx(1e3 / v["images_per_s"])
        assert v["tflop_per_s"] > 0 and v["mfu"] is None          # from the trainer's log rows
    assert set(train["full"]["steps_by_patch_size"]) == {"16"}
    full_gflops = step["flop_model"]["train_gflops_per_image"]["16"]
    assert train["full"]["tflop_per_s"] == pytest.approx(full_gflops * train["full"]["images_per_s"] / 1e3)
    c = train["comparison"]
    assert c["cost_per_image_vs_full"] == pytest.approx(train["patch"]["ms_per_image"] / train["full"]["ms_per_image"])

    sample = res["sample"]["results"]
    assert sample["images_per_s"] > 0 and sample["steps"] == 2 and sample["network_evaluations"] == 3
    forward_gflops = step["flop_model"]["train_gflops_per_image"]["16"] / 3
    assert sample["tflop_per_s"] == pytest.approx(forward_gflops * 3 * sample["images_per_s"] / 1e3)
    assert sample["mfu"] is None
    assert sample["edm_reference"]["images_per_s"] > 0 and sample["speedup_vs_edm_reference"] > 0
    assert (sample["cpu_user_s_per_batch"] > 0 and sample["cpu_sys_s_per_batch"] >= 0
            and sample["minor_faults_per_batch"] >= 0)


def test_cli_reports_missing_data(capsys):
    assert bench_cli.main(["train", "--config", "tiny", *TINY, "--quick", "--device", "cpu"]) == 2
    assert "data.path is empty" in capsys.readouterr().err


def test_prewarm_runs_every_patch_size():
    cfg = load_config("tiny", TINY)
    assert bench.prewarm_kernels(cfg, torch.device("cpu")) == 0.0        # only for eager CUDA runs
    assert bench.prewarm_kernels(cfg, torch.device("cpu"), force=True) > 0


# ---------------------------------------------------------------------------------------------
# The benchmarks table (docs/benchmarks.md) and the suite

def load_make_table():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_table", REPO / "benchmarks" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_table_between_markers(quick_results, tmp_path):
    make_table = load_make_table()
    _, out = quick_results
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    for p in out.glob("*.json"):
        (results / "sub" / p.name).write_text(p.read_text())
    (results / "odd.json").write_text(json.dumps({"something": [1, 2]}))
    readme = tmp_path / "benchmarks.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\ntext\n\n{make_table.BEGIN}\nold\n{make_table.END}\n\n## After\nkeep\n")
    assert make_table.main(["--results", str(results), "--doc", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Benchmarks\n\ntext\n\n") and text.endswith(
        f"{make_table.END}\n\n## After\nkeep\n")
    table = text.split(make_table.BEGIN)[1].split(make_table.END)[0]
    rows = [line for line in table.splitlines() if line.startswith("| pdiff bench")]
    assert len(rows) == 4 and "old" not in table
    assert all("Xeon" in r or "cores" in r for r in rows)                   # the machine is named
    assert "odd.json (unknown shape)" in table
    train_row = next(r for r in rows if r.startswith("| pdiff bench train"))
    ratio = json.loads((out / "train.json").read_text())["results"]["comparison"]["cost_per_image_vs_full"]
    assert f"{ratio:.2f} of full" in train_row
    make_table.main(["--results", str(results), "--doc", str(readme)])
    assert readme.read_text() == text                                        # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="results:begin"):
        make_table.main(["--results", str(results), "--doc", str(readme)])


def test_bench_networks_rows_carry_their_flop_rate_and_the_table_their_mfu(tmp_path):
    """bench_networks (the tiny net, eager, on the CPU): each row's TFLOP/s is its counted training
    FLOPs per patch times patches over the step time; no MFU without a card; make_table shows the
    MFU where a result has one."""
    import importlib.util
    out = tmp_path / "nets.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_networks.py"), "--nets", "tiny",
                        "--iters", "1", "--no-compile", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    spec = importlib.util.spec_from_file_location("bench_networks", REPO / "benchmarks" / "bench_networks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = json.loads(out.read_text())
    rows = [r for r in report["rows"] if "step_ms" in r]
    assert [r["size"] for r in rows] == [8, 16, 32] and report["card"] is None and "MFU n/a" in p.stdout
    for r in rows:
        flops = module.train_flops_per_patch(module.NETS["tiny"], r["size"])
        assert r["tflop_per_s"] == pytest.approx(flops * r["patches"] / (r["step_ms"] / 1e3) / 1e12)
        assert r["mfu"] is None
    per_pixel = [module.train_flops_per_patch(module.NETS["tiny"], s) / s**2 for s in (8, 16, 32)]
    assert per_pixel[0] < per_pixel[2] < 2 * per_pixel[0]        # convolutions: about the pixels' count
    util = float(np.random.default_rng().uniform(0.05, 0.6))
    for r in rows:
        r["mfu"] = util
    _, lines = load_make_table().headlines(out, report)
    assert len(lines) == 1 and lines[0].startswith("tiny eager: ") and "(batch 4), 8px patches" in lines[0]
    assert lines[0].endswith(f"/s, MFU {util:.1%} at full size")


def test_make_table_pipeline_rows_name_resolution_and_the_comparisons():
    """A bench_pipeline result with --before and Pillow's decode costs: its row names the resolution,
    the schedule's per-core ratios against the earlier commit and the decode cost ratios."""
    make_table = load_make_table()
    rows = [{"backend": b, "format": f, "config": c, "images_per_s": 100.0 + i, "images_per_s_per_core": 200.0}
            for i, (b, f, c) in enumerate([("dali", "jpeg", "schedule"), ("torch", "raw", "schedule"),
                                            ("torch", "raw", "s=64")])]
    payload = {"benchmark": "bench_pipeline", "machine": {"cpu": "Some CPU", "cores": 2, "commit": "def5678"},
               "args": {"resolution": 256},
               "results": rows, "per_core_vs_baseline": {},
               "before": {"commit": "abc1234", "per_core_ratio": {"dali-jpeg schedule": 2.345,
                                                                  "torch-raw schedule": 7.5,
                                                                  "torch-raw s=64": 4.0}},
               "decode_cost_region_vs_whole": {"png": {"schedule_ratio": 0.61}, "jpeg": {"schedule_ratio": 0.72}}}
    name, lines = make_table.headlines(Path("pipeline.json"), payload)
    assert name == "bench_pipeline 256x256 (commit def5678)"
    assert lines[1] == "schedule patches/s per core vs commit abc1234: dali-jpeg 2.35x, torch-raw 7.50x"
    assert lines[2] == ("Pillow decode per patch at the schedule, cut at the patch's last row vs whole: "
                        "png 0.61, jpeg 0.72")


def test_gpu_suite_plumbing_without_time(tmp_path):
    """With no time left every stage is skipped: the suite still writes its summary and log. The
    default stages are listed; GPU_SUITE_STAGES picks others."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SUITE_DRY": "1", "GPU_SUITE_BUDGET": "0"}
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "o")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    files = sorted(f.name for f in (tmp_path / "o").iterdir())
    assert files == ["suite.log", "summary.md"]
    summary = (tmp_path / "o" / "summary.md").read_text()
    for stage in ("1 cuda", "2 kernels", "3 step", "10 recipes", "4 sample", "5 pipeline", "6 train", "7 roi"):
        assert f"| {stage} | skipped |" in summary
    assert "train-compile" not in summary and "step-compile" not in summary
    assert p.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])    # the summary is printed last
    env["GPU_SUITE_STAGES"] = "train-compile,roi"
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "p")], env=env,
                       capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "p" / "summary.md").read_text()
    assert "| 7 roi | skipped |" in summary and "| 8 train-compile | skipped |" in summary and "| 3 step" not in summary


@pytest.mark.slow
def test_gpu_suite_dry_run_of_the_issue_14_stages(tmp_path):
    """GPU_SUITE_DRY=1 runs the CPU variants of the new stages: the 256x256-style pipeline (DALI where
    installed, the torch loader) and the patch-schedule training run streaming and with data.cache;
    their JSON carries TFLOP/s, MFU (n/a) and the data wait, and the summary names them."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SUITE_DRY": "1", "GPU_SUITE_STAGES": "roi,train-compile",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "o")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "| 7 roi | ok |" in summary and "| 8 train-compile | ok |" in summary, summary
    train = json.loads((tmp_path / "o" / "train_compile.json").read_text())
    assert set(train["modes"]) == {"eager", "eager cache=device"} and not train["errors"]
    for entry in train["modes"].values():
        assert set(entry) == {"patch"}
        assert entry["patch"]["tflop_per_s"] > 0 and entry["patch"]["mfu"] is None
        assert 0 <= entry["patch"]["data_wait_share"] < 1
    pipe = json.loads((tmp_path / "o" / "pipeline256.json").read_text())
    assert {r["format"] for r in pipe["results"]} == {"jpeg", "raw"}


def load_dali_carry():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dali_carry", REPO / "benchmarks" / "dali_carry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A small pure-Python wheel pip can install: package ``name`` holding ``payload``."""
    import zipfile
    path = folder / f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}/__init__.py": b"", f"{name}/blob.bin": payload,
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: "
                                            b"py3-none-any\n"}
    files[f"{name}-1.0.dist-info/RECORD"] = "".join(f"{k},,\n" for k in [*files,
                                                                         f"{name}-1.0.dist-info/RECORD"]).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_dali_carry_split_carry_join_install(tmp_path):
    """The carry script's logic without a GPU: wheels split into parts, the parts arriving one call
    at a time (each checked), a damaged part caught, then joined, verified and installed with pip
    into a target folder from which the packages import with their bytes intact."""
    carry = load_dali_carry()
    rng = np.random.default_rng()
    here, there = tmp_path / "here", tmp_path / "there"
    (here / "wheels").mkdir(parents=True)
    payloads = {f"fakepkg_{k}": rng.bytes(int(rng.integers(1, 40_000))) for k in "abc"}
    wheels = [fake_wheel(here / "wheels", n, b) for n, b in payloads.items()]
    part = int(rng.integers(5_000, 20_000))
    m = carry.split(sorted(wheels), here, part)
    total = sum(w.stat().st_size for w in wheels)
    assert len(m["parts"]) == -(-total // part) and all(p["bytes"] <= part for p in m["parts"])
    assert sum(p["bytes"] for p in m["parts"]) == total

    there.mkdir()
    (there / "manifest.json").write_bytes((here / "manifest.json").read_bytes())
    names = [p["name"] for p in m["parts"]]
    for k, name in enumerate(names):
        assert carry.main(["check", "--dir", str(there), "--part", name]) == 1          # not carried yet
        (there / name).write_bytes((here / name).read_bytes())                         # the call carries it
        assert carry.main(["check", "--dir", str(there), "--part", name]) == 0
        whole, missing, damaged = carry.check(there)
        assert whole == names[:k + 1] and missing == names[k + 1:] and not damaged
    data = bytearray((there / names[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (there / names[0]).write_bytes(bytes(data))
    assert carry.main(["check", "--dir", str(there)]) == 1
    with pytest.raises(SystemExit, match="cannot join"):
        carry.join(there)
    (there / names[0]).write_bytes((here / names[0]).read_bytes())

    target = tmp_path / "site"
    assert carry.main(["install", "--dir", str(there), "--target", str(target), "--check-import", "fakepkg_b"]) == 0
    for name, payload in payloads.items():
        assert ((there / "wheels" / f"{name}-1.0-py3-none-any.whl").read_bytes()
                == (here / "wheels" / f"{name}-1.0-py3-none-any.whl").read_bytes())
        got = subprocess.run([sys.executable, "-c",
                              f"import {name}, pathlib; print(pathlib.Path({name}.__file__).parent)"],
                             env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
        assert (Path(got.stdout.strip()) / "blob.bin").read_bytes() == payload


def test_dali_carry_plan_names_one_part_per_call(tmp_path):
    """The plan: one device call per part, each carrying the manifest and its part (ignored paths under
    .dali/), checking it on arrival; the last joins, installs and runs the given command. The default
    part size leaves room for the working tree in a call."""
    carry = load_dali_carry()
    rng = np.random.default_rng()
    (tmp_path / "wheels").mkdir()
    wheels = [fake_wheel(tmp_path / "wheels", f"fakepkg_{k}", rng.bytes(int(rng.integers(1, 30_000)))) for k in "ab"]
    m = carry.split(sorted(wheels), tmp_path, int(rng.integers(4_000, 12_000)))
    calls = carry.plan(tmp_path, "benchmarks/gpu_suite.sh /tmp/s")
    assert len(calls) == len(m["parts"]) > 1
    for call, p in zip(calls, m["parts"]):
        assert call["carry"] == [f"{tmp_path}/manifest.json", f"{tmp_path}/{p['name']}"]
        assert call["bytes"] == p["bytes"] + (tmp_path / "manifest.json").stat().st_size
    assert all(f"check --dir {tmp_path} --part {p['name']}" in c["command"] for c, p in zip(calls[:-1], m["parts"]))
    assert calls[-1]["command"] == (f"python3 benchmarks/dali_carry.py install --dir {tmp_path} && "
                                    "benchmarks/gpu_suite.sh /tmp/s")
    assert carry.PART_BYTES + 64 * 1024 + carry.tree_bytes() < carry.CALL_LIMIT   # a part, its manifest, the tree
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", f"{carry.DIR}/part-01"])
    assert ignored.returncode == 0                                        # carry takes ignored paths only


def test_quality_recipes_table_names_the_arm_with_the_lowest_mean_per_recipe():
    """benchmarks/quality_recipes.py's JSON in the results table: per (dataset, recipe), every seed's
    metric at the budget, each arm's mean, and the arm with the lowest mean."""
    make_table = load_make_table()
    rng = np.random.default_rng()
    rows, want = [], {}
    for dataset in ("digits16", "photo32"):
        for recipe in ("ddpmpp", "edm2"):
            vals = {arm: rng.uniform(10, 1000, size=2) for arm in ("full (p=1)", "{8,16} p=0.5")}
            want[(dataset, recipe)] = min(vals, key=lambda a: vals[a].mean())
            rows += [{"dataset": dataset, "recipe": recipe, "seed": s, "arm": arm, "at_budget": float(v[s]),
                      "metric": {"key": "fd_features"}, "points": [{"images": 100, "metric": float(v[s])}]}
                     for arm, v in vals.items() for s in (0, 1)]
    tag, lines = make_table.headlines(Path("q.json"), {"benchmark": "quality_recipes", "rows": rows,
                                                       "budget_cpu_hours_per_arm": 0.03})
    assert tag == "quality per recipe, fd_features at 0.03 CPU-hours per arm (per seed)"
    assert [line.split(":")[0] for line in lines] == [f"{d} {r}" for d, r in want]
    for line, best in zip(lines, want.values()):
        assert line.endswith(f"; lowest mean {best}")
