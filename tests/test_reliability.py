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
import queue
import subprocess
import sys
import threading
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


@pytest.mark.parametrize("how,with_checksum", DAMAGES, ids=[f"{h}-{'sha256' if c else 'no sha256'}"
                                                            for h, c in DAMAGES])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys, how, with_checksum):
    """The newest checkpoint damaged (COMPLETE kept): the resume takes the one before, with a
    warning naming the bad one; with no checksum file (an older pdiff's checkpoint, whose marker
    holds only the images seen) torch.load's failure is caught the same way."""
    rng = np.random.default_rng()
    saved = save_three(tmp_path)
    bad = tmp_path / "checkpoints" / "ckpt-000000000030" / "state.pt"
    if not with_checksum:
        checksum.sidecar(bad).unlink()
        (bad.parent / "COMPLETE").write_text("30\n")
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


@pytest.mark.parametrize("flip", [True, False], ids=["flipped byte", "intact"])
def test_a_deleted_checksum_counts_as_damage(tmp_path, capsys, flip):
    """A checkpoint written with a checksum (its marker says so) whose .sha256 is gone cannot be
    verified: the resume falls back to the one before, as for a mismatch, whether or not its bytes
    were changed too (a flipped byte would otherwise load as different weights, silently)."""
    rng = np.random.default_rng()
    saved = save_three(tmp_path)
    bad = tmp_path / "checkpoints" / "ckpt-000000000030" / "state.pt"
    checksum.sidecar(bad).unlink()
    if flip:
        flip_a_byte(bad, rng)
    part = Part(0)
    images, path = run_state(tmp_path, part).resume()
    assert images == 20 and path.name == "ckpt-000000000020"
    assert all(torch.equal(part.state_dict()[k], v) for k, v in saved[20].items())
    err = capsys.readouterr().err
    assert f"{checksum.sidecar(bad)} is missing" in err and "counts as damaged" in err
    assert "trying the checkpoint before it" in err


def test_a_checkpoint_of_an_older_pdiff_without_checksum_loads_with_a_warning(tmp_path, capsys):
    saved = save_three(tmp_path)
    newest = tmp_path / "checkpoints" / "ckpt-000000000030"
    checksum.sidecar(newest / "state.pt").unlink()
    (newest / "COMPLETE").write_text("30\n")       # the marker an older pdiff wrote
    part = Part(0)
    assert run_state(tmp_path, part).resume()[0] == 30
    assert all(torch.equal(part.state_dict()[k], v) for k, v in saved[30].items())
    assert "has no checksum (written before pdiff wrote them): not verified" in capsys.readouterr().err


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


# ----------------------------------------------------------------------------------------------
# Stopping: Ctrl-C as SIGTERM, a second signal at once, also inside a long compile (issue #23)

def small_config(tmp_path: Path, shards: Path, **train) -> Path:
    """A small run on ``shards`` (16x16 RGB) that would go on for long unless stopped."""
    import yaml
    cfg = {"base": "tiny",
           "network": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
                       "dropout": 0.0},
           "data": {"path": str(shards), "backend": "torch", "workers": 1},
           "optim": {"warmup_images": 16},
           "train": {"run_dir": str(tmp_path / "run"), "batch": 4, "duration_images": 10**7, "log_every_images": 8,
                     "ckpt_every_images": 10**7, "snapshot_every_images": 10**7, "sample_every_images": 0,
                     "compile": False, **train},
           "sample": {"steps": 2}}
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# The CLI with torch.compile replaced by a wrapper whose first call of each shape prints a line and
# then blocks for SLOW seconds, as a long compile under load does. How it blocks is the second
# argument: "python" (a sleep: Python's handlers run during it) or "c" (os.system: the main thread
# waits inside C, where Python runs no handler until it returns).
SLOW_COMPILE = """
import os, sys, time, torch
SLOW, HOW = float(sys.argv[1]), sys.argv[2]
seen = set()
def slow_compile(fn, **kw):
    def compiled(x, *a):
        if tuple(x.shape) not in seen:
            seen.add(tuple(x.shape))
            print(f"compiling {tuple(x.shape)}", file=sys.stderr, flush=True)
            time.sleep(SLOW) if HOW == "python" else os.system(f"sleep {SLOW}")
            print(f"compiled {tuple(x.shape)}", file=sys.stderr, flush=True)
        return fn(x, *a)
    return compiled
torch.compile = slow_compile
from pdiff.cli import main
sys.exit(main(sys.argv[3:]))
"""


def start_trainer(config: Path, *extra, slow: float | None = None, how: str = "python") -> subprocess.Popen:
    """`pdiff train` in its own process group (a terminal's Ctrl-C reaches the whole group: the
    trainer and its DataLoader workers)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PDIFF_PROGRESS_SECONDS": "0"}
    argv = ["train", "--config", str(config), "--device", "cpu", *extra]
    cmd = [PY, "-c", SLOW_COMPILE, str(slow), how, *argv] if slow is not None else [PY, "-m", "pdiff.cli", *argv]
    # Ctrl-C as a terminal's foreground job gets it: a suite started in the background (`make test &`)
    # has SIGINT ignored, which the trainer (rightly) keeps, so the child starts with the default.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> str:
    """stderr up to and including the first line holding ``pattern``; AssertionError when the trainer
    ends first or ``timeout`` seconds pass (a thread reads the lines, so a silent trainer cannot hang
    the suite)."""
    if not hasattr(proc, "lines"):
        proc.lines = queue.Queue()
        threading.Thread(target=lambda: [*map(proc.lines.put, proc.stderr), proc.lines.put(None)],
                         daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = proc.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {pattern!r} from the trainer in {timeout:.0f} s:\n{''.join(seen)}") from None
        if line is None:
            raise AssertionError(f"the trainer ended (rc {proc.wait()}) before printing {pattern!r}:\n{''.join(seen)}")
        seen.append(line)
        if pattern in line:
            return "".join(seen)


def read_rest(proc: subprocess.Popen, timeout: float) -> str:
    """The rest of stderr once the trainer has ended (within ``timeout`` seconds)."""
    proc.wait(timeout=timeout)
    rest = []
    while (line := proc.lines.get(timeout=30)) is not None:
        rest.append(line)
    return "".join(rest)


def test_ctrl_c_stops_like_sigterm_and_the_run_resumes(tmp_path, random_shards):
    """Ctrl-C in a terminal (SIGINT to the trainer and its data workers): the step is finished, a
    checkpoint and a snapshot are written, exit 0 with the resume hint; the same command resumes."""
    config = small_config(tmp_path, random_shards)
    proc = start_trainer(config)
    try:
        err = read_until(proc, "img/s")             # training: a log line
        os.killpg(proc.pid, signal.SIGINT)
        rest = read_rest(proc, timeout=300)
    finally:
        proc.kill()
    err += rest
    assert proc.returncode == 0, err
    assert "SIGINT: finishing the step" in err and "stop signal: stopped at" in err
    assert "run the same command to resume" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    (ckpt,) = CheckpointManager(tmp_path / "run").complete()
    images = int(ckpt.name.split("-")[1])
    assert images > 0 and (tmp_path / "run" / "snapshots" / f"ema-{images:012d}.safetensors").exists()
    p = subprocess.run([PY, "-m", "pdiff.cli", "train", "--config", str(config), "--device", "cpu",
                        f"train.duration_images={images + 8}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and f"resuming at {images:,} images from {ckpt}" in p.stderr, p.stderr


@pytest.mark.parametrize("sig, how", [(signal.SIGINT, "python"), (signal.SIGTERM, "python")], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_inside_a_long_compile_exits_at_once(tmp_path, random_shards, sig, how):
    """A compile that will not finish for ten minutes: the first signal asks for a clean stop
    (acted on after that compile), the second ends the process at once, without a traceback, with
    the status a shell reports for the signal (128 + its number); nothing is left half-written."""
    proc = start_trainer(small_config(tmp_path, random_shards), "train.compile=true", slow=600, how=how)
    try:
        err = read_until(proc, "compiling")
        proc.send_signal(sig)
        err += read_until(proc, "finishing the step")
        proc.send_signal(sig)
        rest = read_rest(proc, timeout=60)          # far less than the compile's 600 s
    finally:
        proc.kill()
    err += rest
    assert proc.returncode == 128 + sig, err
    assert f"second {signal.Signals(sig).name}: stopping now" in err and "Traceback" not in err
    assert "compiled (" not in err            # both signals were acted on inside the compile
    assert CheckpointManager(tmp_path / "run").latest() is None


# ----------------------------------------------------------------------------------------------
# Resuming with changed settings: said, and kept in the run's history (issue #23)

def cli_run(capsys, *argv) -> tuple[int, str, str]:
    from pdiff import cli
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_resume_with_changed_settings_says_so_and_keeps_the_history(tmp_path, random_shards, capsys, one_thread):
    import yaml
    config = small_config(tmp_path, random_shards, duration_images=16, ckpt_every_images=16)
    rc, _, err = cli_run(capsys, "train", "--config", config, "--device", "cpu", "data.workers=0")
    assert rc == 0, err
    run = tmp_path / "run"
    (first,) = run.glob("config-*.yaml")                     # the config of a fresh start, at 0 images
    assert first.name == "config-000000000000.yaml" and first.read_text() == (run / "config.yaml").read_text()
    images = int(CheckpointManager(run).latest().name.split("-")[1])
    rng = np.random.default_rng()
    lr = float(rng.choice([3e-4, 5e-4, 7e-4]))
    rc, _, err = cli_run(capsys, "train", "--config", config, "--device", "cpu", "data.workers=0",
                         f"optim.lr={lr}", f"train.duration_images={images + 8}")
    assert rc == 0, err
    assert "resuming with 2 changed setting(s)" in err
    assert f"optim.lr: 0.001 -> {lr!r}" in err and f"train.duration_images: 16 -> {images + 8}" in err
    current = yaml.safe_load((run / "config.yaml").read_text())
    assert current["optim"]["lr"] == lr
    assert yaml.safe_load((run / f"config-{images:012d}.yaml").read_text()) == current
    assert yaml.safe_load(first.read_text())["optim"]["lr"] == 0.001          # the first part's value stays on record
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (change,) = [r for r in rows if "config_changed" in r]
    assert change["images_seen"] == images
    assert change["config_changed"] == {"optim.lr": [0.001, lr], "train.duration_images": [16, images + 8]}
    # The same settings again: nothing new is recorded.
    rc, _, err = cli_run(capsys, "train", "--config", config, "--device", "cpu", "data.workers=0",
                         f"optim.lr={lr}", f"train.duration_images={images + 8}")
    assert rc == 0 and "changed setting" not in err and len(list(run.glob("config-*.yaml"))) == 2
    # A refused change of the network names the keys that differ, not the whole section.
    rc, _, err = cli_run(capsys, "train", "--config", config, "--device", "cpu", "network.model_channels=16",
                         "network.dropout=0.1")
    assert rc == 1 and "network.model_channels was 8 and is now 16" in err, err
    assert "network.dropout was 0.0 and is now 0.1" in err and "'arch'" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# YAML keys given twice (issue #23)

@pytest.mark.parametrize("text, line, key", [
    ("base: tiny\noptim:\n  lr: 1e-4\n  eps: 1e-8\n  lr: 2e-4\n", 5, "lr"),
    ("base: tiny\ntrain: {batch: 8}\noptim: {lr: 1e-4}\ntrain:\n  seed: 3\n", 4, "train"),
    ("base: tiny\nbase: celeba64\n", 2, "base"),
    ("base: tiny\ntrain: {batch: 8, batch: 16}\n", 2, "batch"),
], ids=["key", "section", "base", "flow mapping"])
def test_a_key_given_twice_is_refused_naming_file_line_and_key(tmp_path, capsys, text, line, key):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    rc, _, err = cli_run(capsys, "train", "--config", path, "--dry-run")
    assert rc == 2 and f"{path}:{line}: duplicate key {key!r}" in err and "Traceback" not in err, err


def test_a_key_given_twice_in_a_base_file_is_refused(tmp_path, capsys):
    (tmp_path / "common.yaml").write_text("base: tiny\nema:\n  halflife_images: 100\n\n  halflife_images: 200\n")
    (tmp_path / "my.yaml").write_text("base: common.yaml\noptim: {lr: 1e-4}\n")
    rc, _, err = cli_run(capsys, "train", "--config", tmp_path / "my.yaml", "--dry-run")
    assert rc == 2 and f"{tmp_path / 'common.yaml'}:5: duplicate key 'halflife_images'" in err, err
    rc, _, err = cli_run(capsys, "train", "--config", "tiny", "--dry-run", "optim={lr: 1, lr: 2}")
    assert rc == 2 and "duplicate key 'lr'" in err, err


def test_every_preset_loads_through_the_duplicate_checking_loader():
    from pdiff.config import PRESET_DIR
    for preset in PRESET_DIR.glob("*.yaml"):
        load_config(preset.stem)


# ----------------------------------------------------------------------------------------------
# User errors that came with a traceback (issue #23)

def test_config_naming_a_folder_is_a_message(tmp_path, capsys):
    rc, _, err = cli_run(capsys, "train", "--config", tmp_path, "--dry-run")
    assert rc == 2 and f"config {tmp_path}: is a folder, not a YAML file" in err and "Traceback" not in err
    (tmp_path / "config.yaml").write_text("base: tiny\n")       # a run folder: its config is named
    rc, _, err = cli_run(capsys, "info", "--config", tmp_path)
    assert rc == 2 and f"--config {tmp_path / 'config.yaml'}" in err, err


def test_a_run_folder_that_cannot_be_written_is_a_message(tmp_path, random_shards, capsys, monkeypatch):
    """Tests run as root, who may write anywhere: the read-only folder is simulated by making the
    lock file's creation fail as it does for another user (PermissionError)."""
    import pdiff.runlock as runlock
    real_open = os.open

    def read_only(path, flags, *a):
        if str(path).endswith(LOCK_FILE) and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)
    monkeypatch.setattr(runlock.os, "open", read_only)
    rc, _, err = cli_run(capsys, "train", "--config", small_config(tmp_path, random_shards), "--device", "cpu")
    assert rc == 1 and f"cannot take the lock {tmp_path / 'run' / LOCK_FILE}: Permission denied" in err
    assert "train.run_dir" in err and "Traceback" not in err


@pytest.mark.parametrize("errno_", ["EFBIG", "ENOSPC"])
def test_a_disk_filling_up_during_a_checkpoint_is_a_message_and_leaves_no_temporary_folder(tmp_path, errno_,
                                                                                       monkeypatch):
    """The file system refuses the bytes half way through state.pt (torch.save then raises its
    'unexpected pos' RuntimeError): the error names the file, the size needed and the space free; the
    temporary folder is removed and the previous checkpoint stays the newest."""
    import errno
    part = Part(int(np.random.default_rng().integers(1 << 30)))
    rs = run_state(tmp_path, part)
    rs.save(10)
    limit = int(np.random.default_rng().integers(100, 800))
    real_write = checksum._HashingWriter.write

    def full_disk(self, data):
        if self.written + len(data) > limit:
            raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)))
        return real_write(self, data)
    monkeypatch.setattr(checksum._HashingWriter, "write", full_disk)
    with pytest.raises(CheckpointError) as e:
        rs.save(20)
    msg = str(e.value)
    assert "the checkpoint at 20 images could not be written" in msg and os.strerror(getattr(errno, errno_)) in msg
    assert "state.pt needs about" in msg and "MiB are free in" in msg and "ckpt-000000000010" in msg
    assert ".tmp-ckpt-000000000020" in msg          # the file it was writing
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-000000000010"]
    assert CheckpointManager(tmp_path).latest().name == "ckpt-000000000010"


def test_a_disk_filling_up_during_training_is_reported_without_a_traceback(tmp_path, random_shards, capsys,
                                                                          monkeypatch, one_thread):
    import errno

    def full_disk(self, data):
        raise OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(checksum._HashingWriter, "write", full_disk)
    rc, _, err = cli_run(capsys, "train", "--config", small_config(tmp_path, random_shards, duration_images=8),
                         "--device", "cpu", "data.workers=0")
    assert rc == 1 and "could not be written" in err and "File too large" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()]


def test_triton_kernels_on_a_cpu_are_a_message(tmp_path, random_shards, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)        # conftest sets it for the kernel tests
    import pdiff.kernels
    monkeypatch.setattr(pdiff.kernels, "triton_available", lambda: True)   # installed, as on a CPU machine with pip
    config = small_config(tmp_path, random_shards)
    for extra in ([], ["--dry-run"]):
        rc, _, err = cli_run(capsys, "train", "--config", config, "--device", "cpu", "train.kernels=triton", *extra)
        assert rc == 1 and "train.kernels=triton needs a CUDA device (got cpu)" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()              # refused before anything was created
