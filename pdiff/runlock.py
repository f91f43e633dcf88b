"""One trainer per run folder: an exclusive lock on RUN/LOCK, held while training.

Two mechanisms, because shared filesystems differ in what they honour:

* a kernel lock (``fcntl.lockf`` on the file, byte-range locks that NFS and most cluster
  filesystems carry across hosts): the kernel drops it when the holder dies, however it dies;
* a record in the file, JSON: host, pid, the process's start (boot id and start tick, so a reused
  pid is told apart), when it took the lock and a heartbeat a thread renews every HEARTBEAT_S. It
  names the holder in the refusal, and it still refuses a second trainer where the kernel lock is
  only local to one host. A record is stale when its process is gone (same host: pid, boot and
  start tick are checked) or, from another host, when its heartbeat is older than STALE_AFTER_S.

Under torchrun only rank 0 takes the lock (``distributed.hold_run``: the ranks agree on the
outcome); the job's other processes work under it. `pdiff shard` holds the same lock on its output
folder (``pipelines/shards/write.py``), so this module needs no torch. The file stays when the lock
is released: its record then says so, and deleting a file another process may be about to lock
would race.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError

LOCK_FILE = "LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0    # ten missed heartbeats: clocks of the hosts may differ by less than this
_RECORD_BYTES = 1024     # the record is rewritten in place, padded to this size, in one write
HEARTBEAT_THREAD = "pdiff-run-lock"


class RunFolderError(UserError):
    """The run folder cannot be written (its lock cannot be created)."""


class RunLocked(UserError):
    """Another live trainer holds the run folder."""
    every_rank = True     # rank 0 asks for the lock and every rank learns the answer


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_tick(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot ("" where /proc cannot say)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]      # field 22; the name in (...) may hold spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        return True
    return True


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).astimezone().isoformat(timespec="seconds")


def describe(record: dict, now: float | None = None) -> str:
    """'host H, pid P, since T (heartbeat N s ago)' for a refusal message."""
    now = time.time() if now is None else now
    beat = record.get("heartbeat", record.get("started", now))
    return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, since "
            f"{_when(record.get('started', now))} (last heartbeat {max(0.0, now - beat):.0f} s ago)")


def is_stale(record: dict, now: float | None = None) -> str:
    """Why the holder ``record`` names is gone ("" while it may be alive)."""
    now = time.time() if now is None else now
    if record.get("released"):
        return "released"
    if record.get("host") == socket.gethostname():
        if record.get("boot_id") and record.get("boot_id") != _boot_id():
            return "its host has rebooted since"
        pid = int(record.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return f"process {pid} is gone"
        if record.get("start_tick") and _start_tick(pid) and _start_tick(pid) != record["start_tick"]:
            return f"process {pid} is gone (the pid now belongs to another process)"
        return ""
    age = now - float(record.get("heartbeat", 0))
    return f"no heartbeat for {age:.0f} s" if age > STALE_AFTER_S else ""


class RunLock:
    """``with RunLock(run_dir):`` holds RUN/LOCK or raises RunLocked naming the holder."""

    def __init__(self, run_dir: str | os.PathLike, settle_s: float = 0.2):
        self.path = Path(run_dir) / LOCK_FILE
        self.settle_s = settle_s     # how long a record must stay ours before we count on it
        self._fd: int | None = None
        self._record: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record ---------------------------------------------------------------------------
    def _read(self) -> dict:
        """The record in the file ({} when there is none, or it is not one: then nobody holds it)."""
        for _ in range(5):        # a record being rewritten may read as garbage for a moment
            raw = os.pread(self._fd, _RECORD_BYTES, 0).rstrip(b"\0 \n")
            try:
                record = json.loads(raw) if raw else {}
                return record if isinstance(record, dict) else {}
            except ValueError:
                time.sleep(0.05)
        return {}

    def _write(self, record: dict) -> None:
        data = json.dumps(record).encode().ljust(_RECORD_BYTES)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    # -- taking and giving back ---------------------------------------------------------------
    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:        # read-only, not ours, a file in the way
            raise RunFolderError(f"cannot take the lock {self.path}: {e.strerror or e}; pdiff writes its output "
                                 f"into {self.path.parent}: give a folder this user can write (for a run: "
                                 f"train.run_dir=...) or fix its permissions") from None
        try:
            self._take()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._thread = threading.Thread(target=self._beat, name=HEARTBEAT_THREAD, daemon=True)
        self._thread.start()
        return self

    def _refuse(self, holder: dict) -> RunLocked:
        return RunLocked(
            f"{self.path.parent} is in use by another trainer: {describe(holder)}. Stop that one first, or "
            f"use another train.run_dir. (The lock in {self.path} lapses by itself when its holder "
            f"dies: at once on the same host, after {STALE_AFTER_S:.0f} s without a heartbeat from another.)")

    def _kernel_lock(self) -> bool:
        """Take the kernel lock: True when taken, False where the filesystem keeps no locks (the
        record alone decides then); RunLocked while another process holds it. POSIX locks
        (``lockf``) rather than ``flock``: forked children (DataLoader workers) do not inherit them,
        so none can hold the run after its trainer died."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise self._refuse(self._read()) from None
            return False      # ENOLCK, EOPNOTSUPP, ...

    def _take(self) -> None:
        self._kernel_lock()
        holder = self._read()
        if holder and not is_stale(holder):
            raise self._refuse(holder)
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
                        "start_tick": _start_tick(os.getpid()), "started": now, "heartbeat": now}
        self._write(self._record)
        # Where the kernel lock does not reach another host, two trainers can both find the record
        # stale and write their own: the later write wins, and the earlier one sees it here.
        time.sleep(self.settle_s)
        now_there = self._read()
        if (now_there.get("host"), now_there.get("pid")) != (self._record["host"], self._record["pid"]):
            raise self._refuse(now_there)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._record["heartbeat"] = time.time()
                self._write(self._record)
            except OSError:      # a full or vanished disk: the trainer itself reports that
                pass

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._write({**self._record, "released": time.time()})
        except OSError:
            pass
        os.close(self._fd)        # drops the kernel lock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
