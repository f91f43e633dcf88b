"""Elastic resume and restarts without a person, with torchrun and gloo on the CPU (docs/multinode.md).

A checkpoint written by W processes goes on on W' processes with the same global batch: the sample
ids every step reads after the resume equal an uninterrupted run's, and the model ends where that
run ends. The runs share one uninterrupted one-process reference (a module fixture); each resume
starts from a copy of a reference checkpoint, so no run is repeated.

Tolerances: one process takes the mean of the step's loss over all rows; W processes each take the
mean of their rows and DDP averages the W gradients. The sums run in another order, so float32
rounding differs at ~1e-7 per step and Adam carries it on: after ~20 steps the parameters agree to
rtol 1e-4 / atol 1e-5 (as tests/test_train.py's two-process test), not bit for bit. Two runs whose
reduction order is the same (the same checkpoint resumed on two processes of one node and on two
loopback nodes of one process each) agree bit for bit. These tests launch 8 training jobs of a tiny
network for 192 images each; marked slow (7 minutes in all on 2 cores shared with other work at a
load of ~12).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_train import PY, REPO, final_state, free_port, log_rows, write_config

from pdiff.checkpoint import CheckpointManager

pytestmark = pytest.mark.slow

DURATION = 192
TRACE = Path(__file__).with_name("trace_train.py")


def env_for(trace: Path) -> dict:
    trace.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PDIFF_TRACE": str(trace)}


def train_args(config: Path) -> list[str]:
    return [str(TRACE), "train", "--config", str(config), "--device", "cpu"]


def one_process(config: Path, trace: Path) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, *train_args(config)], cwd=REPO, env=env_for(trace), capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def torchrun(config: Path, trace: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                        str(free_port()), *train_args(config)],
                       cwd=REPO, env=env_for(trace), capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def node_cmd(port: int, nnodes: str, *extra: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pdiff-test", *extra]


def two_nodes(config: Path, trace: Path) -> list[str]:
    """Two loopback "nodes", one torchrun each; their stderr."""
    cmd = node_cmd(free_port(), "2") + train_args(config)
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env_for(trace), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [n.communicate(timeout=600)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    return errs


def steps_read(trace: Path, world: int | None = None) -> dict[int, list[int]]:
    """images seen -> the sample ids of the global step that starts there, rows in order (rank r's
    rows are r, r+W, ...); each step must have been read by all W ranks of its run, once (``world``:
    only the steps read by that many processes)."""
    parts: dict[int, dict[int, list[int]]] = {}
    worlds: dict[int, int] = {}
    for file in trace.glob("trace-*.jsonl"):
        for row in map(json.loads, file.read_text().splitlines()):
            if world is not None and row["world"] != world:
                continue
            assert row["rank"] not in parts.setdefault(row["images_seen"], {}), f"step read twice: {row}"
            parts[row["images_seen"]][row["rank"]] = row["indices"]
            worlds[row["images_seen"]] = row["world"]
    steps = {}
    for n, by_rank in parts.items():
        w = worlds[n]
        assert sorted(by_rank) == list(range(w)), (n, sorted(by_rank))
        rows = [None] * sum(len(v) for v in by_rank.values())
        for r, ids in by_rank.items():
            rows[r::w] = ids
        steps[n] = rows
    return steps


def assert_same_steps_after(trace: Path, reference: dict[int, list[int]], resumed_at: int,
                            world: int | None = None) -> None:
    got = steps_read(trace, world)
    after = {n: ids for n, ids in got.items() if n >= resumed_at}
    assert after and min(after) == resumed_at and max(after) == max(n for n in reference)
    assert after == {n: ids for n, ids in reference.items() if n >= resumed_at}


def assert_models_close(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")


def resume_from(reference_run: Path, images: int, run_dir: Path) -> None:
    """A run folder holding only the reference's checkpoint at ``images`` (as if it had stopped there)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_run / "checkpoints" / f"ckpt-{images:012d}",
                    run_dir / "checkpoints" / f"ckpt-{images:012d}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_shards):
    """An uninterrupted one-process run (its checkpoints every 64 images kept), with the steps it read."""
    root = tmp_path_factory.mktemp("elastic")
    train = {"duration_images": DURATION, "ckpt_every_images": 64, "keep_checkpoints": 5}
    one_cfg = write_config(root, digits_shards, run="one", train=train, data={"xflip": True})
    one_process(one_cfg, root / "trace-one")
    return root, steps_read(root / "trace-one"), digits_shards, train


def test_resume_from_one_process_on_two_and_back_on_one(tmp_path, reference):
    """1 -> 2 processes on one node, 1 -> 2 loopback nodes (both from the reference's first
    checkpoint), then 2 -> 1 process (from a checkpoint the two processes wrote): every step after
    each resume reads the uninterrupted run's samples, and each run ends with its model."""
    root, steps, shards, train = reference
    at = int(CheckpointManager(root / "one").complete()[0].name.split("-")[1])
    assert 0 < at < DURATION
    ref = final_state(root / "one")
    # On one node with two processes.
    cfg = write_config(tmp_path, shards, run="procs", train=train, data={"xflip": True})
    resume_from(root / "one", at, tmp_path / "procs")
    p = torchrun(cfg, tmp_path / "trace-procs")
    assert f"resuming at {at:,} images" in p.stderr and "resumed on 2 processes (written by 1)" in p.stderr
    assert p.stderr.count("resumed on 2 processes") == 1                # rank 0 says it
    assert_same_steps_after(tmp_path / "trace-procs", steps, at)
    procs = final_state(tmp_path / "procs")
    assert procs["world_size"] == 2 and procs["images_seen"] == ref["images_seen"] >= DURATION
    assert_models_close(ref, procs)
    # On two loopback nodes of one process each: the same reduction order, so bit for bit the same.
    cfg = write_config(tmp_path, shards, run="nodes", train=train, data={"xflip": True})
    resume_from(root / "one", at, tmp_path / "nodes")
    errs = two_nodes(cfg, tmp_path / "trace-nodes")
    assert sum("resumed on 2 processes (written by 1)" in e for e in errs) == 1
    assert_same_steps_after(tmp_path / "trace-nodes", steps, at)
    nodes = final_state(tmp_path / "nodes")
    for part in ("model", "ema"):
        for k in procs[part]:
            assert torch.equal(procs[part][k], nodes[part][k]), f"{part}.{k}"
    # (the resumed runs' logs also hold the row that records their changed settings: no loss there)
    losses = [[r["loss"] for r in log_rows(tmp_path / run) if "loss" in r] for run in ("procs", "nodes")]
    assert losses[0] and losses[0] == losses[1]
    # Back on one process, from the two processes' next checkpoint.
    later = [int(c.name.split("-")[1]) for c in CheckpointManager(tmp_path / "procs").complete()]
    at2 = next(n for n in later if at < n < DURATION)
    cfg = write_config(tmp_path, shards, run="alone", train=train, data={"xflip": True})
    resume_from(tmp_path / "procs", at2, tmp_path / "alone")
    p = one_process(cfg, tmp_path / "trace-alone")
    assert f"resuming at {at2:,} images" in p.stderr and "resumed on 1 process (written by 2)" in p.stderr
    assert_same_steps_after(tmp_path / "trace-alone", steps, at2)
    alone = final_state(tmp_path / "alone")
    assert alone["world_size"] == 1 and alone["images_seen"] == ref["images_seen"]
    assert_models_close(ref, alone)


def test_a_user_error_under_the_launcher_is_one_message_without_a_traceback(tmp_path, reference):
    """train.batch=3 over 2 processes: a config error naming both numbers, raised by every rank
    before anything is created, printed once (by rank 0); `pdiff launch` (torchrun's launcher)
    ends the job with one line and the error's exit status 2, where torchrun itself would print its
    ChildFailedError traceback."""
    _, _, shards, _ = reference
    cfg = write_config(tmp_path, shards, run="three", train={"batch": 3})
    p = subprocess.run([PY, "-m", "pdiff.cli", "launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
                        "-m", "pdiff.cli", "train", "--config", str(cfg), "--device", "cpu"],
                       cwd=REPO, env=env_for(tmp_path / "trace"), capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.count("which 2 processes cannot share evenly") == 1, p.stderr[-3000:]
    assert "carries 3 patches (train.batch=3 x 1)" in p.stderr
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("pdiff launch: the job failed: rank ") == 1 and "exited with code 2" in p.stderr
    assert not (tmp_path / "three").exists()


def test_a_node_killed_mid_run_and_the_job_goes_on_by_itself(tmp_path, reference):
    """Restarts without a person: two loopback "nodes" under torchrun's elastic agent (--nnodes 1:2
    --max-restarts 3). Node 1 (its agent and worker) is killed with SIGKILL after the first
    checkpoint; node 0's worker fails on its next collective, its agent starts a new rendezvous, which
    completes with the one node left, and the new worker resumes from the newest checkpoint on one
    process (written by two): the job ends at its duration, exit status 0, as the uninterrupted run."""
    root, steps, shards, train = reference
    cfg = write_config(tmp_path, shards, run="job", train=train, data={"xflip": True})
    port = free_port()
    conf = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=120"
    nodes = [subprocess.Popen(node_cmd(port, "1:2", "--max-restarts", "3", "--rdzv-conf", f"{conf},is_host={h}")
                              + train_args(cfg), cwd=REPO, env=env_for(tmp_path / "trace"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for h in (1, 0)]     # node 0 hosts the rendezvous store: the node killed is the other one
    ckpts = CheckpointManager(tmp_path / "job")
    deadline = time.time() + 300
    while ckpts.latest() is None and time.time() < deadline and nodes[1].poll() is None:
        time.sleep(0.05)
    # torchrun starts each worker in a session of its own: the node is its agent and its worker. On a
    # loaded machine the agents may be between a rendezvous and their (re)started workers: wait for one.
    workers, until = "", time.time() + 60
    while not workers.split() and time.time() < until and nodes[1].poll() is None:
        workers = subprocess.run(["pgrep", "-P", str(nodes[1].pid)], capture_output=True, text=True,
                                 check=False).stdout
        time.sleep(0.0 if workers.split() else 0.2)
    assert workers.split(), (f"node 1 has no worker (exit status {nodes[1].poll()}):\n"
                             + (nodes[1].communicate()[1][-4000:] if nodes[1].poll() is not None else ""))
    os.kill(nodes[1].pid, signal.SIGKILL)         # the agent first, so that it restarts nothing
    for pid in workers.split():
        os.kill(int(pid), signal.SIGKILL)
    nodes[1].wait()
    assert nodes[1].returncode == -signal.SIGKILL, "node 1 ended before it could be killed"
    err = nodes[0].communicate(timeout=600)[1]
    assert nodes[0].returncode == 0, err[-4000:]
    assert "resumed on 1 process (written by 2)" in err, err[-4000:]
    at = int(err.split("resuming at ")[1].split(" images")[0].replace(",", ""))
    assert 0 < at < DURATION
    assert_same_steps_after(tmp_path / "trace", steps, at, world=1)
    job, ref = final_state(tmp_path / "job"), final_state(root / "one")
    assert job["world_size"] == 1 and job["images_seen"] == ref["images_seen"] >= DURATION
    assert_models_close(ref, job)
