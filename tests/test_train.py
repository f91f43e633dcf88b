"""The trainer end to end on the CPU: learning, DDP equivalence, exact resume after kill -9,
crash-safe checkpoints, resuming past a damaged checkpoint, one trainer per run folder, SIGTERM
(also during the compile warm-up), resume guards, TensorBoard output and compile stability.

Runs use a very small DDPM++ on scikit-learn's digits (real scans) at 16x16 so each takes seconds.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pdiff.checkpoint import CheckpointError, CheckpointManager
from pdiff.checksum import save_verified
from pdiff.config import load_config

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def write_config(tmp_path: Path, shards: Path, run: str = "run", **sections) -> Path:
    cfg = {
        "base": "tiny",
        "network": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                    "attn_resolutions": [8], "dropout": 0.0, "label_dim": 0},
        "data": {"path": str(shards), "resolution": 16, "channels": 1, "backend": "torch", "workers": 0},
        # three patch sizes (the paper's set), so that every test runs the multi-size paths; 16 px
        # is below where the default set has R/4 (docs/patch_defaults.md)
        "patch": {"sizes": [4, 8, 16], "probs": [0.2, 0.3, 0.5]},
        "optim": {"lr": 2e-3, "warmup_images": 64},
        "ema": {"halflife_images": 200},
        "train": {"run_dir": str(tmp_path / run), "batch": 8, "duration_images": 320,
                  "log_every_images": 32, "ckpt_every_images": 96, "snapshot_every_images": 10**9,
                  "sample_every_images": 10**9, "compile": False, "deterministic": True},
        "sample": {"steps": 2},
    }
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, *overrides: str, env_extra=None, check=True, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    p = subprocess.run([PY, "-m", "pdiff.cli", "train", "--config", str(config), "--device", "cpu", *overrides],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    return CheckpointManager.load(CheckpointManager(run_dir).latest())


def run_two_processes(config: Path) -> subprocess.CompletedProcess:
    """`pdiff train` on ``config`` as two gloo processes under torchrun; fails the test if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "-m", "pdiff.cli", "train", "--config", str(config), "--device", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def kill_at_first_checkpoint(config: Path, run_dir: Path, duration: int) -> int:
    """Start `pdiff train` on ``config``, SIGKILL it once its first checkpoint is complete, and return
    the images seen of that checkpoint (strictly inside the run of ``duration`` images)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([PY, "-m", "pdiff.cli", "train", "--config", str(config), "--device", "cpu"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = CheckpointManager(run_dir)
    deadline = time.time() + 300
    while ckpts.latest() is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(ckpts.latest().name.split("-")[1])
    assert 0 < killed_at < duration
    return killed_at


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------

def test_training_lowers_the_loss(tmp_path, digits_shards):
    """A short run on real digits lowers the EDM loss, measured at fixed noise on fixed images."""
    from pdiff.kernels import edm_loss_ref, net_input_ref
    from pdiff.model import build_model
    cfg_path = write_config(tmp_path, digits_shards, train={"duration_images": 2400, "ckpt_every_images": 2400})
    run_train(cfg_path)
    cfg = load_config(cfg_path)
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg)          # the trainer's initial weights (same seed)
    trained = build_model(cfg)
    trained.load_state_dict(final_state(Path(cfg.train.run_dir))["model"])
    data = np.load(digits_shards.parent / "digits.npz")["images"][:128]
    y = torch.from_numpy(data).float()[:, None] / 127.5 - 1
    g = torch.Generator().manual_seed(123)
    sigma = torch.exp(torch.randn(128, generator=g) * 1.2 - 1.2)
    noise = torch.randn(y.shape, generator=g)
    off = torch.zeros(128, 2, dtype=torch.long)

    def loss(model):
        F = model.raw(net_input_ref(y, sigma, off, 16, noise), sigma)
        return edm_loss_ref(F, y, sigma, noise).mean()
    with torch.no_grad():
        before, after = loss(initial), loss(trained)
    assert after < 0.6 * before, (float(before), float(after))


def test_two_processes_match_one_process(tmp_path, digits_shards):
    """torchrun with 2 gloo processes and 1 process with the same global batch end with the same
    parameters, with the patch schedule on: samples, crop positions, flips, labels, sigmas and noise
    are dealt out of the global step by rank (rows r, r+W, ...), and DDP averages the gradients
    (without the "Grad strides do not match" warning every rank printed while attention fed its
    output projection a channels_last view)."""
    common = dict(train={"duration_images": 160, "ckpt_every_images": 160}, data={"xflip": True},
                  network={"label_dim": 10})
    one = write_config(tmp_path, digits_shards, run="one", **common)
    two = write_config(tmp_path, digits_shards, run="two", **common)
    run_train(one)
    p = run_two_processes(two)
    # The attention's 1x1 convs return gradients in their weights' layout: DDP's buckets match them.
    assert "Grad strides do not match bucket view strides" not in p.stderr, p.stderr[-3000:]
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert b["world_size"] == 2 and a["images_seen"] == b["images_seen"] >= 160
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    la = [r["loss"] for r in log_rows(tmp_path / "one")]
    lb = [r["loss"] for r in log_rows(tmp_path / "two")]
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def test_in_memory_mode_trains_exactly_like_streaming(tmp_path, digits_shards):
    """data.cache=device feeds the same patches as the streaming loader, so a deterministic run ends
    with the same weights, bit for bit, and logs the same losses."""
    common = dict(train={"duration_images": 96, "ckpt_every_images": 96})
    stream = write_config(tmp_path, digits_shards, run="stream", **common)
    cached = write_config(tmp_path, digits_shards, run="cached", data={"cache": "device"}, **common)
    run_train(stream)
    p = run_train(cached)
    assert "data backend memory" in p.stderr and "data.cache=device: 512 samples" in p.stderr
    a, b = final_state(tmp_path / "stream"), final_state(tmp_path / "cached")
    assert a["images_seen"] == b["images_seen"] >= 96
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in log_rows(tmp_path / "stream")] == [r["loss"] for r in log_rows(tmp_path / "cached")]


def test_two_nodes_on_loopback_match_one_process(tmp_path, digits_shards):
    """Multi-node rendezvous (torchrun's c10d): two "nodes" of one process each on loopback train
    like one process with the same global batch."""
    common = dict(train={"duration_images": 96, "ckpt_every_images": 96})
    one = write_config(tmp_path, digits_shards, run="one", **common)
    two = write_config(tmp_path, digits_shards, run="nodes", **common)
    run_train(one)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    port = free_port()
    cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pdiff-test",
           "-m", "pdiff.cli", "train", "--config", str(two), "--device", "cpu"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [n.communicate(timeout=600)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    a, b = final_state(tmp_path / "one"), final_state(tmp_path / "nodes")
    assert b["world_size"] == 2 and a["images_seen"] == b["images_seen"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("ema_mode, arch", [("halflife", "ddpmpp"),
                                            pytest.param("power", "ddpmpp", marks=pytest.mark.slow),
                                            ("power", "edm2")])
def test_kill9_and_rerun_matches_uninterrupted_run(tmp_path, digits_shards, ema_mode, arch):
    """kill -9 mid-run, re-run the same command: the trajectory (losses at every log point from the
    checkpoint on), the final parameters and every EMA (with ema.mode=power: both tracked averages
    and every snapshot of them) equal an uninterrupted run's bit for bit, and the data pipeline
    resumes exactly where the checkpoint was (no sample repeated or skipped). Dropout and label
    dropout are on: their masks must follow images seen, not the steps of this process. edm2: with
    EDM2's dynamics (learned weighting, inv_sqrt learning rate, forced weight normalization)."""
    long = {"duration_images": 640}   # leaves a wide window between the first checkpoint and the end
    if ema_mode == "power":
        long["snapshot_every_images"] = 128
    net = {"arch": arch, "dropout": 0.2, "label_dim": 10, "label_dropout": 0.3}
    ema = {"mode": ema_mode, "halflife_images": 200}
    more = {}
    if arch == "edm2":
        more = dict(loss={"weighting": "learned"}, optim={"lr": 1e-2, "schedule": "inv_sqrt", "ref_images": 128,
                                                         "betas": [0.9, 0.99]})
    ref_cfg = write_config(tmp_path, digits_shards, run="ref", train=long, network=net, ema=ema, **more)
    run_train(ref_cfg)
    cfg = write_config(tmp_path, digits_shards, run="killed", train=long, network=net, ema=ema, **more)
    killed_at = kill_at_first_checkpoint(cfg, tmp_path / "killed", 640)
    run_train(cfg)
    ref, res = final_state(tmp_path / "ref"), final_state(tmp_path / "killed")
    averages = (list(zip(ref["ema"]["profiles"], res["ema"]["profiles"])) if ema_mode == "power"
                else [(ref["ema"], res["ema"])])
    assert len(averages) == (2 if ema_mode == "power" else 1)
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], res["model"][k]), k
        for ref_ema, res_ema in averages:
            assert torch.equal(ref_ema[k], res_ema[k]), k
    if ema_mode == "power":
        from safetensors.torch import load_file
        names = sorted(p.name for p in (tmp_path / "ref" / "snapshots").glob("*.safetensors"))
        assert len(names) >= 8 and names == sorted(p.name
                                                   for p in (tmp_path / "killed" / "snapshots").glob("*.safetensors"))
        for name in names:
            a, b = (load_file(str(tmp_path / run / "snapshots" / name)) for run in ("ref", "killed"))
            assert all(torch.equal(a[k], b[k]) for k in a), name
    ref_rows = {r["images_seen"]: r["loss"] for r in log_rows(tmp_path / "ref")}
    res_rows = [r for r in log_rows(tmp_path / "killed") if r["images_seen"] > killed_at]
    assert res_rows and all(ref_rows[r["images_seen"]] == r["loss"] for r in res_rows)
    assert ref["pipeline"] == res["pipeline"]


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=2)
    first = {"model": {"w": torch.randn(3)}, "images_seen": 10}
    mgr.save(first, 10)
    # A crash after the data is written but before the rename: no new checkpoint appears.
    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        mgr.save({"model": {"w": torch.randn(3)}, "images_seen": 20}, 20)
    monkeypatch.undo()
    assert mgr.latest().name == "ckpt-000000000010"
    assert torch.equal(CheckpointManager.load(mgr.latest())["model"]["w"], first["model"]["w"])
    # A folder under the final name without its COMPLETE marker (crash before the marker) is
    # ignored, refused by load, and cleaned up once a newer checkpoint is complete.
    half = tmp_path / "checkpoints" / "ckpt-000000000020"
    half.mkdir()
    (half / "state.pt").write_bytes(b"truncated")
    assert mgr.latest().name == "ckpt-000000000010"
    with pytest.raises(CheckpointError, match="incomplete"):
        CheckpointManager.load(half)
    mgr.save({"model": {"w": torch.randn(3)}}, 30)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-000000000010", "ckpt-000000000030"]


def test_sigkill_during_checkpoint_writes_never_corrupts(tmp_path):
    """A process SIGKILLed at random moments while writing large checkpoints always leaves the
    newest complete one loadable."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from pdiff.checkpoint import CheckpointManager
m = CheckpointManager({str(tmp_path)!r}, keep=2)
i = 0
while True:
    i += 1
    m.save({{"model": {{"w": torch.full((4_000_000,), float(i))}}, "images_seen": i}}, i)
    print(i, flush=True)
"""
    rng = np.random.default_rng()
    for _ in range(3):
        p = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # at least one checkpoint is complete
        time.sleep(float(rng.uniform(0.0, 0.5)))
        p.kill()
        p.wait()
        latest = CheckpointManager(tmp_path).latest()
        state = CheckpointManager.load(latest)
        assert float(state["model"]["w"][0]) == state["images_seen"]


def test_sigterm_checkpoints_and_exits_zero(tmp_path, digits_shards):
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 10**7, "ckpt_every_images": 10**7})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([PY, "-m", "pdiff.cli", "train", "--config", str(cfg), "--device", "cpu"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 300
    while (not log.exists() or not log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "stop signal" in err
    latest = CheckpointManager(tmp_path / "run").latest()
    assert latest is not None and CheckpointManager.load(latest)["images_seen"] > 0


def test_sigterm_to_every_rank_of_a_torchrun_job(tmp_path, digits_shards):
    """As a cluster's scheduler does at preemption: SIGTERM reaches every worker; the ranks agree,
    finish the step, write one checkpoint and the job exits 0."""
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 10**7, "ckpt_every_images": 10**7})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.Popen([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(free_port()), "-m", "pdiff.cli", "train", "--config", str(cfg), "--device", "cpu"],
                           cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 300
    while (not log.exists() or not log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in workers:
        os.kill(int(pid), signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    state = CheckpointManager.load(CheckpointManager(tmp_path / "run").latest())
    assert state["world_size"] == 2 and state["images_seen"] > 0


def test_resume_guards(tmp_path, digits_shards):
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 64, "ckpt_every_images": 64})
    run_train(cfg)
    p = run_train(cfg, "train.batch=16", "train.duration_images=128", check=False)
    assert p.returncode != 0 and "train.batch was 8 and is now 16" in p.stderr
    # Another world size resumes (tests/test_elastic.py runs it): edit the checkpoint's record as a
    # 2-process run would have written it, both ranks' pipeline states included.
    latest = CheckpointManager(tmp_path / "run").latest()
    state = torch.load(latest / "state.pt", weights_only=True)
    state["world_size"], state["pipeline"] = 2, state["pipeline"] * 2
    save_verified(latest / "state.pt", lambda f: torch.save(state, f))     # with its checksum, as a run writes it
    p = run_train(cfg, "train.duration_images=128", check=False)
    assert p.returncode == 0 and "resumed on 1 process (written by 2)" in p.stderr


def test_tensorboard_has_scalars_and_samples(tmp_path, digits_shards):
    """Every scalar sits in a group (train/, perf/, loss_by_patch/, loss_by_sigma/); patch sizes and
    sigma bins sort in their numeric order; the resolved config is there as text and as hparams;
    the time spent on snapshots, grids and checkpoints is logged on its own."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from pdiff.monitor import SIGMA_BIN_NAMES
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 96, "sample_every_images": 96})
    run_train(cfg)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for name in ["train/loss", "train/lr", "train/grad_norm", "perf/images_per_s", "perf/data_wait_share",
                 "perf/peak_memory_gb", "train/nonfinite_steps", "perf/snapshot_s", "perf/sample_s",
                 "perf/checkpoint_s"]:
        assert name in scalars, (name, scalars)
    assert all("/" in t for t in scalars), sorted(t for t in scalars if "/" not in t)
    patches = sorted(t for t in scalars if t.startswith("loss_by_patch/"))
    assert patches == ["loss_by_patch/004", "loss_by_patch/008", "loss_by_patch/016"], patches
    bins = sorted(t for t in scalars if t.startswith("loss_by_sigma/"))
    order = [SIGMA_BIN_NAMES.index(t.split("lnsigma", 1)[1]) for t in bins]
    assert len(bins) >= 3 and order == sorted(order), bins
    assert acc.Tags()["images"] == ["samples/ema"]
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "duration_images: 96" in text
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugins and b"train.duration_images" in plugins["_hparams_/session_start_info"]
    rows = log_rows(tmp_path / "run")
    assert rows[-1]["images_seen"] >= 96 and "loss" in rows[-1]
    assert "perf/tflop_per_s" in scalars and "perf/mfu" not in scalars      # MFU is n/a on a CPU (null in the log)
    # TFLOP/s per images/s is the interval's training FLOPs per image: its steps (the schedule's, a
    # pure function of images seen) times their patches' FLOPs, counted by the FLOP model.
    from pdiff.flops import train_flops_by_size
    from pdiff.schedule import PatchSchedule
    run_cfg = load_config(cfg)
    flops, sched, before = train_flops_by_size(run_cfg), PatchSchedule.from_config(run_cfg), 0
    for row in (r for r in rows if "images_per_s" in r):
        steps = list(sched.steps(before, until=row["images_seen"]))
        per_image = sum(st.batch * flops[st.patch_size] for st in steps) / sum(st.batch for st in steps)
        assert row["tflop_per_s"] * 1e12 / row["images_per_s"] == pytest.approx(per_image, rel=1e-9)
        assert row["mfu"] is None
        before = row["images_seen"]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_compiled_run_has_no_recompiles_after_warmup(tmp_path, digits_shards):
    """torch.compile: every patch size is compiled once at start; no step compiles again. With
    aot_eager: dynamo's graphs and guards (what recompiles) are the same as with inductor, whose CPU
    code generation for the six graphs took 4-10 min of a 2-core machine (inductor itself is run on
    CUDA by benchmarks/gpu_suite.sh: the compiled-step test and the train-compile stage)."""
    cfg = write_config(tmp_path, digits_shards, train={"compile": True, "compile_backend": "aot_eager",
                                                        "duration_images": 192, "log_every_images": 64,
                                                        "grad_accum": 2})
    run_train(cfg)
    rows = log_rows(tmp_path / "run")
    sizes = {k for r in rows for k in r if k.startswith("loss_patch/")}
    assert sizes == {"loss_patch/4", "loss_patch/8", "loss_patch/16"}, sizes
    assert [r["recompiles_after_warmup"] for r in rows] == [0] * len(rows)


def test_in_training_fid_is_logged(tmp_path, digits_shards):
    """With reference statistics and Inception weights given, FID is computed from the EMA model
    at its interval and logged (random-init Inception: this checks the plumbing, not the number)."""
    from pdiff.fid import load_inception, save_stats
    weights = tmp_path / "inception.pth"
    torch.save(load_inception(random_init=True).state_dict(), weights)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    save_stats(tmp_path / "ref.npz", rng.normal(size=2048), a @ a.T / 64, 64, 16)
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 64},
                       eval={"fid_every_images": 64, "fid_images": 4, "fid_batch": 4,
                             "fid_ref": str(tmp_path / "ref.npz"), "inception": str(weights)})
    run_train(cfg)
    rows = [r for r in log_rows(tmp_path / "run") if "fid/4" in r]
    assert len(rows) == 1 and rows[0]["images_seen"] >= 64 and np.isfinite(rows[0]["fid/4"])


def test_dry_run_prints_resolved_config_and_plan(tmp_path, digits_shards):
    cfg = write_config(tmp_path, digits_shards)
    p = subprocess.run([PY, "-m", "pdiff.cli", "train", "--config", str(cfg), "--dry-run", "train.batch=4",
                        "patch.sizes=[]", "patch.probs=[]", "patch.real_p=0.25"], cwd=REPO, capture_output=True,
                        text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    printed = yaml.safe_load(p.stdout.split("# patch schedule")[0])
    assert printed["train"]["batch"] == 4 and printed["patch"]["real_p"] == 0.25
    # the default set at 16 px with p = 0.25 (docs/patch_defaults.md): {8, 16} with (1-p, p)
    assert "8px p=0.75 x2 (8 patches)" in p.stdout and "16px p=0.25 x1 (4 patches)" in p.stdout
    assert not (tmp_path / "run").exists()   # nothing was started
    bad = run_train(cfg, "train.batchsize=4", check=False)
    assert bad.returncode == 2 and "unknown key 'batchsize'" in bad.stderr and "Traceback" not in bad.stderr


def test_trainer_runs_the_triton_kernels(tmp_path, digits_shards):
    """The CUDA path's wiring (in-kernel Philox noise from (seed, step) in both kernels) through the
    Triton interpreter: a short run with train.kernels=triton learns like the torch path."""
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 128, "kernels": "triton"})
    run_train(cfg, env_extra={"TRITON_INTERPRET": "1"})
    rows = log_rows(tmp_path / "run")
    assert rows and all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows)
    ref_cfg = write_config(tmp_path, digits_shards, run="ref", train={"duration_images": 128})
    run_train(ref_cfg)
    a, b = final_state(tmp_path / "run"), final_state(tmp_path / "ref")
    # Different noise streams (Philox vs torch), same data and sizes: close, not equal.
    assert a["images_seen"] == b["images_seen"]
    la = np.mean([r["loss"] for r in rows])
    lb = np.mean([r["loss"] for r in log_rows(tmp_path / "ref")])
    assert abs(la - lb) < 0.25 * lb, (la, lb)


def test_class_conditional_training_and_label_range(tmp_path, digits_shards):
    """Labels from the shards condition the network (with label dropout); a label_dim smaller than
    the dataset's classes is refused before anything is created, naming the fix."""
    cfg = write_config(tmp_path, digits_shards, network={"label_dim": 10, "label_dropout": 0.1},
                       train={"duration_images": 64, "sample_every_images": 64}, sample={"guidance": 1.5})
    run_train(cfg)
    state = final_state(tmp_path / "run")
    assert state["model"]["net.map_label.weight"].shape[1] == 10
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    bad = write_config(tmp_path, digits_shards, run="bad", network={"label_dim": 5})
    p = run_train(bad, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"network.label_dim=5 (given in {bad})" in p.stderr and "have 10 classes" in p.stderr
    assert "set network.label_dim=10" in p.stderr and not (tmp_path / "bad").exists()


def test_gradient_accumulation_matches_one_pass(tmp_path, digits_shards):
    """train.grad_accum=3 splits each step into micro-batches (uneven ones too) and ends where one
    pass over the whole batch ends."""
    a = write_config(tmp_path, digits_shards, run="one", train={"duration_images": 96})
    b = write_config(tmp_path, digits_shards, run="acc", train={"duration_images": 96, "grad_accum": 3})
    run_train(a)
    run_train(b)
    sa, sb = final_state(tmp_path / "one"), final_state(tmp_path / "acc")
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_signal_handlers_are_restored_after_training(digits_shards, tmp_path):
    """In-process callers (the demo, pdiff bench, notebooks) get their SIGTERM back once train()
    returns; a handler left behind would swallow terminate() in the process and in the pool workers
    it forks later. During the run the trainer's handler records the request."""
    from pdiff.train import StopSignal, train
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    before = {sig: signal.signal(sig, mine) for sig in StopSignal.SIGNALS}
    try:
        cfg = load_config(str(write_config(tmp_path, digits_shards, train={"duration_images": 32})))
        stop = StopSignal()
        assert train(cfg, "cpu", stop=stop) == 0 and not stop.requested
        for sig in StopSignal.SIGNALS:
            assert signal.getsignal(sig) is mine
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert stop.requested and not seen
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# Nothing lost (issue #16): damaged checkpoints, two trainers, the order at a boundary, SIGTERM
# during the compile warm-up, a non-finite loss after a resume.

@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_and_ends_as_an_uninterrupted_run(tmp_path, digits_shards):
    """A flipped byte in the newest checkpoint's state.pt (COMPLETE kept): the re-run resumes from
    the one before, naming the bad one, and ends bit for bit where an uninterrupted run ends; with
    every checkpoint damaged it stops with their paths (no traceback) instead of starting over."""
    ckpt = {"ckpt_every_images": 64, "keep_checkpoints": 3}
    cfg = write_config(tmp_path, digits_shards, run="run", train={"duration_images": 192, **ckpt})
    run_train(cfg)
    *_, before, newest = CheckpointManager(tmp_path / "run").complete()
    resumed_at = CheckpointManager.load(before)["images_seen"]
    data = bytearray((newest / "state.pt").read_bytes())
    data[int(np.random.default_rng().integers(len(data) // 4, len(data)))] ^= 0x20
    (newest / "state.pt").write_bytes(bytes(data))
    p = run_train(cfg, "train.duration_images=320")
    assert f"{newest / 'state.pt'} is damaged" in p.stderr and f"resuming at {resumed_at:,} images" in p.stderr
    ref = write_config(tmp_path, digits_shards, run="ref", train={"duration_images": 320, **ckpt})
    run_train(ref)
    a, b = final_state(tmp_path / "run"), final_state(tmp_path / "ref")
    assert a["images_seen"] == b["images_seen"] == 320
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for folder in CheckpointManager(tmp_path / "run").complete():
        (folder / "state.pt").write_bytes((folder / "state.pt").read_bytes()[:100])
    p = run_train(cfg, "train.duration_images=384", check=False)
    assert p.returncode == 1 and "no usable checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.count("ckpt-000000000") >= 3


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_is_refused_naming_the_first(tmp_path, digits_shards):
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 10**7, "ckpt_every_images": 10**7})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([PY, "-m", "pdiff.cli", "train", "--config", str(cfg), "--device", "cpu"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        log = tmp_path / "run" / "log.jsonl"
        deadline = time.time() + 300
        while (not log.exists() or not log.read_text()) and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = run_train(cfg, check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert "in use by another trainer" in second.stderr and f"pid {first.pid}" in second.stderr
        assert f"host {socket.gethostname()}" in second.stderr and "since" in second.stderr
        assert first.poll() is None                 # the first trains on, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert CheckpointManager.load(CheckpointManager(tmp_path / "run").latest())["images_seen"] > 0


@pytest.mark.slow
def test_every_rank_of_a_torchrun_job_is_refused_a_held_run(tmp_path, digits_shards):
    """Rank 0 asks for the lock and every rank learns the answer: the whole job stops, none hangs.
    (The data is checked before the lock is taken, so that a mistake there creates no run folder.)"""
    from pdiff.runlock import RunLock
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with RunLock(tmp_path / "run"):
        p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(free_port()), "-m", "pdiff.cli", "train", "--config", "tiny", "--device", "cpu",
                            f"train.run_dir={tmp_path / 'run'}", f"data.path={digits_shards}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    # every rank stops at the refusal; rank 0 alone prints it, and the job ends with its exit status
    assert p.stderr.count(f"is in use by another trainer: host {socket.gethostname()}, pid {os.getpid()}") == 1
    assert "exitcode  : 1" in p.stderr


def test_the_checkpoint_comes_before_the_sample_grid_at_a_boundary(tmp_path, digits_shards, monkeypatch, one_thread):
    """A sample grid (or snapshot, or FID) that fails at an interval boundary loses no training:
    the checkpoint of that boundary is already written."""
    import pdiff.train
    from pdiff.train import train

    def broken_grid(*a, **k):
        raise RuntimeError("the sampler broke")
    monkeypatch.setattr(pdiff.train, "sample_grid", broken_grid)     # the name the trainer calls
    cfg = load_config(str(write_config(tmp_path, digits_shards, train={"duration_images": 128, "ckpt_every_images": 64,
                                                                       "sample_every_images": 64})))
    with pytest.raises(RuntimeError, match="the sampler broke"):
        train(cfg, "cpu")
    latest = CheckpointManager(tmp_path / "run").latest()
    assert latest is not None and CheckpointManager.load(latest)["images_seen"] >= 64


def test_sigterm_during_the_compile_warm_up_stops_before_the_next_graph(tmp_path, digits_shards, monkeypatch,
                                                                        one_thread, capsys):
    """SIGTERM arrives while the first graph compiles: no further graph is compiled, the run stops
    cleanly (exit 0) before any step and leaves no checkpoint behind. (torch.compile is replaced by
    the identity here so that each warm-up graph is an eager pass: the stop logic is the same.)"""
    from pdiff.step import PatchLoss
    from pdiff.train import train
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    calls = []
    forward = PatchLoss.forward

    def forward_signalled(self, *a, **k):
        calls.append(a[0].shape)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)      # as a scheduler would, mid-compile
        return forward(self, *a, **k)
    monkeypatch.setattr(PatchLoss, "forward", forward_signalled)
    cfg = load_config(str(write_config(tmp_path, digits_shards, train={"compile": True, "grad_accum": 3,
                                                                       "duration_images": 10**6})))
    assert train(cfg, "cpu") == 0
    assert len(calls) == 1        # the schedule has 3 sizes x 2 micro-batch sizes to warm up
    assert "stop signal during the compile warm-up" in capsys.readouterr().err
    assert CheckpointManager(tmp_path / "run").latest() is None


@pytest.mark.slow
def test_a_nonfinite_loss_right_after_a_resume_is_reported(tmp_path, digits_shards):
    """A checkpoint that verifies and holds finite values, but values no step survives (here: the
    weights scaled by 1e30): the first step after the resume names the checkpoint."""
    cfg = write_config(tmp_path, digits_shards, train={"duration_images": 64, "ckpt_every_images": 64})
    run_train(cfg)
    latest = CheckpointManager(tmp_path / "run").latest()
    state = torch.load(latest / "state.pt", weights_only=True)
    state["model"] = {k: v * 1e30 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_verified(latest / "state.pt", lambda f: torch.save(state, f))
    p = run_train(cfg, "train.duration_images=128")
    assert f"the first step after resuming from {latest} has a non-finite loss" in p.stderr
