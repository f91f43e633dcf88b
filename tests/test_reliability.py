"""Nothing lost, nothing silent (issue #16): checksums on checkpoints and snapshots, resuming past a
damaged checkpoint, rotation that keeps the last good one, the run folder's lock, config values
refused at load, and user errors reported without a traceback. The trainer end to end is in
test_train.py; these run in-process in well under a second each.
"""
from __future__ import annotations

import hashlib
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

from pdiff import checksum
from pdiff.checkpoint import CheckpointError, CheckpointManager, RunState, nonfinite_entries
from pdiff.config import ConfigError, load_config
from pdiff.runlock import LOCK_FILE, STALE_AFTER_S, RunLock, RunLocked, is_stale

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ----------------------------------------------------------------------------------------------
# Checksums

def flip_a_byte(path: Path, rng) -> int:
    data = bytearray(path.read_bytes())
    at = int(rng.integers(0, len(data)))
    data[at] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(data))
    return at


def test_checksum_is_written_in_sha256sum_format_and_catches_a_flipped_byte(tmp_path):
    rng = np.random.default_rng()
    data = rng.bytes(int(rng.integers(1, 200_000)))
    path = tmp_path / "blob.bin"
    digest = checksum.save_verified(path, lambda f: f.write(data))
    assert path.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()
    assert checksum.sidecar(path).read_text() == f"{digest}  blob.bin\n"      # `sha256sum -c` reads it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "blob.bin.sha256"]   # no temp files
    assert checksum.verify(path) is True
    flip_a_byte(path, rng)
    with pytest.raises(checksum.ChecksumError, match=str(path)):
        checksum.verify(path)
    checksum.sidecar(path).unlink()
    assert checksum.verify(path) is False        # no checksum: unverified, not refused


def test_a_crash_while_saving_never_leaves_a_file_its_checksum_calls_damaged(tmp_path, monkeypatch):
    path = tmp_path / "snap.safetensors"
    checksum.save_verified(path, lambda f: f.write(b"old contents"))

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checksum.save_verified(path, lambda f: f.write(b"new contents"))
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents"
    checksum.verify(path)        # does not raise: the old file, verified or (at worst) unverified
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_snapshot_with_a_flipped_byte_is_refused_naming_it(tmp_path):
    from pdiff.model import build_model
    from pdiff.snapshot import SnapshotError, load_snapshot, save_snapshot
    cfg = load_config("tiny", ["network.model_channels=8", "network.channel_mult=[1]", "network.attn_resolutions=[]",
                               "data.resolution=8"])
    path = save_snapshot(tmp_path / "ema-000000000064.safetensors", build_model(cfg), cfg, 64)
    load_snapshot(path)
    # Flip a byte in the tensor data (past the header), where safetensors itself would not notice.
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[int(np.random.default_rng().integers(header, len(data)))] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=f"{path.name} is damaged"):
        load_snapshot(path)


# ----------------------------------------------------------------------------------------------
# Checkpoints: fallback and rotation

class Part:
    """A stateful part as RunState sees one: a small model with an optimizer state."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(16, 16)

    def state_dict(self):
        return self.net.state_dict()

    def load_state_dict(self, state):
        self.net.load_state_dict(state)


def run_state(tmp_path, part, keep=3):
    return RunState(tmp_path, {"network": 1, "data": {"resolution": 8, "channels": 1}, "patch": 0, "loss": 0,
                               "train": {"batch": 1, "seed": 0}}, keep, model=part)


def save_three(tmp_path, keep=3) -> dict[int, dict]:
    """Checkpoints at 10, 20 and 30 images, each with other random weights: {images: weights}."""
    part, saved = Part(int(np.random.default_rng().integers(1 << 30))), {}
    rs = run_state(tmp_path, part, keep)
    for n in (10, 20, 30):
        with torch.no_grad():
            for p in part.net.parameters():
                p.copy_(torch.randn_like(p))
        rs.save(n)
        saved[n] = {k: v.clone() for k, v in part.state_dict().items()}
    return saved


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def damage(state_pt: Path, how: str, rng) -> None:
    if how == "flipped byte":
        flip_a_byte(state_pt, rng)
    elif how == "truncated":
        state_pt.write_bytes(state_pt.read_bytes()[: int(rng.integers(1, state_pt.stat().st_size))])
    elif how == "random bytes":
        state_pt.write_bytes(rng.bytes(state_pt.stat().st_size))
    elif how == "pickled code":
        torch.save({"model": Evil()}, state_pt)
    else:
        raise ValueError(how)


# Without a checksum a flipped byte may well load: that case is what the checksum is for.
DAMAGES = [(how, True) for how in ("flipped byte", "truncated", "random bytes", "pickled code")] + \
          [(how, False) for how in ("truncated", "random bytes", "pickled code")]


@pytest.mark.parametrize("how,with_checksum", DAMAGES, ids=[f"{h}-{'sha256' if c else 'no sha256'}" for h, c in DAMAGES])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys, how, with_checksum):
    """The newest checkpoint damaged (COMPLETE kept): the resume takes the one before, with a
    warning naming the bad one; with no checksum file (an older pdiff's checkpoint) torch.load's
    failure is caught the same way."""
    rng = np.random.default_rng()
    saved = save_three(tmp_path)
    bad = tmp_path / "checkpoints" / "ckpt-000000000030" / "state.pt"
    if not with_checksum:
        checksum.sidecar(bad).unlink()
    damage(bad, how, rng)
    part = Part(0)
    images, path = run_state(tmp_path, part).resume()
    assert images == 20 and path.name == "ckpt-000000000020"
    for k, v in saved[20].items():
        assert torch.equal(part.state_dict()[k], v), k
    err = capsys.readouterr().err
    assert str(bad) in err and "trying the checkpoint before it" in err
    if how == "pickled code" and not with_checksum:
        assert "weights_only" in err and "posix.system" in err
    assert "Traceback" not in err


def test_resume_refuses_when_no_checkpoint_is_good(tmp_path, capsys):
    rng = np.random.default_rng()
    save_three(tmp_path)
    folders = CheckpointManager(tmp_path).complete()
    for folder, how in zip(folders, ["truncated", "random bytes", "flipped byte"]):
        damage(folder / "state.pt", how, rng)
    with pytest.raises(CheckpointError) as e:
        run_state(tmp_path, Part(0)).resume()
    for folder in folders:
        assert str(folder / "state.pt") in str(e.value)
    assert "move" in str(e.value) and "start the run over" in str(e.value)


def test_rotation_never_prunes_the_newest_good_checkpoint(tmp_path, capsys):
    """A run whose weights turn non-finite keeps writing checkpoints (keep_checkpoints=1) but
    rotation keeps the last good one; a later resume skips the non-finite ones and takes it."""
    part = Part(1)
    rs = run_state(tmp_path, part, keep=1)
    rs.save(10)
    good = {k: v.clone() for k, v in part.state_dict().items()}
    with torch.no_grad():
        part.net.weight[int(np.random.default_rng().integers(16)), 3] = float("nan")
    rs.save(20)
    rs.save(30)
    assert "non-finite" in capsys.readouterr().err
    names = [p.name for p in CheckpointManager(tmp_path).complete()]
    assert names == ["ckpt-000000000010", "ckpt-000000000030"]
    fresh = Part(2)
    images, path = run_state(tmp_path, fresh, keep=1).resume()
    assert images == 10
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())
    assert "ckpt-000000000030" in capsys.readouterr().err


def test_rotation_after_a_fallback_keeps_the_checkpoint_resumed_from(tmp_path, capsys):
    """After resuming past a damaged newest checkpoint, new checkpoints that hold non-finite
    weights never rotate the resumed one away, however small keep_checkpoints is."""
    save_three(tmp_path)
    damage(tmp_path / "checkpoints" / "ckpt-000000000030" / "state.pt", "truncated", np.random.default_rng())
    part = Part(3)
    rs = run_state(tmp_path, part, keep=1)
    assert rs.resume()[0] == 20
    with torch.no_grad():
        part.net.bias.fill_(float("inf"))
    rs.save(40)
    rs.save(50)
    names = [p.name for p in CheckpointManager(tmp_path).complete()]
    assert "ckpt-000000000020" in names and names[-1] == "ckpt-000000000050"


def test_nonfinite_entries_names_the_tensor():
    state = {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)},
             "optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")]), "step": torch.tensor(3.0)}}}}
    assert nonfinite_entries(state) == ["optimizer.state.0.exp_avg"]
    state["optimizer"]["state"][0]["exp_avg"][1] = 0
    assert nonfinite_entries(state) == []


# ----------------------------------------------------------------------------------------------
# The run folder's lock

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from pdiff.runlock import RunLock
with RunLock({run!r}):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_another_process(run: Path) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", HOLD.format(repo=str(REPO), run=str(run))], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_holder_is_refused_naming_the_first_until_it_dies(tmp_path):
    run = tmp_path / "run"
    holder = hold_in_another_process(run)
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(run).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and f"host {socket.gethostname()}" in msg and "since" in msg
        assert str(run) in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(run) as lock:        # the holder died: its lock is stale at once
        record = json.loads((run / LOCK_FILE).read_bytes().rstrip())
        assert record["pid"] == os.getpid() and lock is not None
    record = json.loads((run / LOCK_FILE).read_bytes().rstrip())
    assert record.get("released")
    with RunLock(run):                # released: free again
        pass


def write_record(run: Path, **record) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_FILE).write_bytes(json.dumps(record).encode().ljust(1024))


def test_the_record_decides_where_the_filesystem_keeps_no_locks(tmp_path, monkeypatch):
    """Where kernel locks do not reach (some cluster filesystems): another host's record holds
    while its heartbeat is fresh; a record on this host holds while its process lives (the same
    process: its pid and its start tick)."""
    monkeypatch.setattr(RunLock, "_kernel_lock", lambda self: False)
    run, now = tmp_path / "run", time.time()
    write_record(run, host="node-17", pid=4242, started=now - 3600, heartbeat=now - 20)
    with pytest.raises(RunLocked, match="host node-17, pid 4242"):
        RunLock(run, settle_s=0).acquire()
    write_record(run, host="node-17", pid=4242, started=now - 3600, heartbeat=now - STALE_AFTER_S - 60)
    RunLock(run, settle_s=0).acquire().release()

    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"])
    try:
        from pdiff.runlock import _boot_id, _start_tick
        alive = dict(host=socket.gethostname(), pid=sleeper.pid, boot_id=_boot_id(), started=now, heartbeat=now - 10**6)
        tick = ""
        for _ in range(100):        # /proc/PID/stat exists once the child runs
            tick = _start_tick(sleeper.pid)
            if tick:
                break
            time.sleep(0.01)
        write_record(run, **alive, start_tick=tick)
        with pytest.raises(RunLocked, match=f"pid {sleeper.pid}"):      # alive, however old its heartbeat
            RunLock(run, settle_s=0).acquire()
        assert is_stale({**alive, "start_tick": str(int(tick) + 1)}) != ""   # the pid now names another process
        assert is_stale({**alive, "boot_id": "another boot"}) != ""
    finally:
        sleeper.kill()
        sleeper.wait()
    assert "gone" in is_stale({**alive, "start_tick": tick})
    write_record(run, **alive, start_tick=tick)
    RunLock(run, settle_s=0).acquire().release()


def test_the_later_of_two_simultaneous_writers_wins(tmp_path, monkeypatch):
    """Without kernel locks two trainers may both find the lock free; after writing its record
    each waits and reads it back, and the one whose record was overwritten gives way."""
    monkeypatch.setattr(RunLock, "_kernel_lock", lambda self: False)
    run = tmp_path / "run"
    lock = RunLock(run, settle_s=0)
    real_sleep = time.sleep

    def other_host_writes_meanwhile(s):
        write_record(run, host="node-3", pid=7, started=time.time(), heartbeat=time.time())
        real_sleep(0)
    monkeypatch.setattr(time, "sleep", other_host_writes_meanwhile)
    with pytest.raises(RunLocked, match="host node-3, pid 7"):
        lock.acquire()


# ----------------------------------------------------------------------------------------------
# Config values refused at load, naming the key

BAD_VALUES = [
    ("sample.steps", 0), ("train.duration_images", -1), ("train.ckpt_every_images", -5),
    ("train.grad_accum", 0), ("train.grad_accum", -2), ("data.workers", -1), ("train.keep_checkpoints", 0),
    ("ema.halflife_images", -1), ("loss.sigma_data", 0), ("loss.sigma_data", -0.5), ("optim.lr", "nan"),
    ("optim.lr", "inf"), ("network.channel_mult", "[]"), ("network.channel_mult", "[1,0]"),
    ("network.model_channels", 0), ("network.num_blocks", 0), ("network.dropout", 1.0), ("data.channels", 0),
    ("optim.betas", "[0.9]"), ("optim.eps", 0), ("sample.sigma_min", 0), ("sample.sigma_max", 0.001),
    ("train.log_every_images", -1), ("train.wall_budget_s", "nan"), ("eval.fid_batch", 0),
    ("patch.sizes", "[5]"), ("sample.canvas", 8), ("data.prefetch", 0),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_config_refuses_values_that_cannot_run(key, value):
    overrides = [f"{key}={value}"] + (["patch.probs=[1.0]"] if key == "patch.sizes" else [])
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert key.split(".")[0] in str(e.value) and (key in str(e.value) or key == "patch.sizes")


def test_config_refusal_reaches_the_user_without_a_traceback(tmp_path):
    p = subprocess.run([PY, "-m", "pdiff.cli", "train", "--config", "tiny", "sample.steps=0", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "sample.steps: must be at least 1, got 0" in p.stderr
    assert "Traceback" not in p.stderr


def test_user_errors_of_every_kind_derive_from_one_class():
    from pdiff.errors import UserError
    from pdiff.fid import FIDError, InceptionWeightsMissing
    from pdiff.pipelines import PipelineStateError, ShardError, SourceError
    from pdiff.pipelines.shards import ShardInputError
    from pdiff.runlock import RunLocked
    from pdiff.posthoc import PosthocError
    from pdiff.snapshot import SnapshotError
    for cls in (ConfigError, CheckpointError, checksum.ChecksumError, FIDError, InceptionWeightsMissing,
                PipelineStateError, ShardError, SourceError, ShardInputError, RunLocked, SnapshotError,
                PosthocError):
        assert issubclass(cls, UserError), cls


def test_a_checkpoint_refused_by_weights_only_is_reported_without_a_traceback(tmp_path):
    """`pdiff sample --checkpoint` on a state.pt holding pickled code: the refusal names the file."""
    ck = tmp_path / "run" / "checkpoints" / "ckpt-000000000010"
    ck.mkdir(parents=True)
    torch.save({"ema": Evil()}, ck / "state.pt")
    (ck / "COMPLETE").write_text("10\n")
    p = subprocess.run([PY, "-m", "pdiff.cli", "sample", "--checkpoint", str(tmp_path / "run"), "--seeds", "0",
                        "--npz", str(tmp_path / "x.npz"), "--device", "cpu"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and str(ck / "state.pt") in p.stderr and "weights_only" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_a_data_error_in_train_is_reported_without_a_traceback(tmp_path):
    p = subprocess.run([PY, "-m", "pdiff.cli", "train", "--config", "tiny", "--device", "cpu",
                        f"data.path={tmp_path / 'no-such-shards'}", f"train.run_dir={tmp_path / 'run'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and "no-such-shards" in p.stderr and "Traceback" not in p.stderr
