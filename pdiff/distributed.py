"""torchrun integration, the one place that joins the process group: rank facts, small collective
helpers, the ranks' agreement on stopping, and leaving the group together."""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError
from .runlock import RunFolderError, RunLock, RunLocked


class DeviceError(UserError, RuntimeError):
    """The device asked for does not exist here (a --device flag the machine cannot honour)."""


def check_device(device: torch.device) -> None:
    """Refuse a CUDA device this torch cannot use, saying why and what to pass instead."""
    if device.type != "cuda":
        return
    if not torch.backends.cuda.is_built():
        raise DeviceError(f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; use "
                          f"--device cpu, or install a CUDA build of torch (https://pytorch.org/get-started)")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --device cpu, or run on a GPU "
                          "machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def resolve_device(name: str | torch.device = "auto", index: int | None = None) -> torch.device:
    """The device a --device flag names: "auto" (CUDA where it exists, else the CPU), "cpu", "cuda"
    (cuda:``index`` when ``index`` is given) or "cuda:N"; a DeviceError for a name torch does not
    know or a CUDA device this machine cannot use."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and dev.index is None and index is not None:
        dev = torch.device("cuda", index)
    check_device(dev)
    return dev


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), or run alone.

    ``device``: "auto" (cuda:LOCAL_RANK where CUDA exists, else the CPU), "cpu", "cuda"
    (cuda:LOCAL_RANK) or "cuda:N". NCCL with one GPU per process on CUDA; gloo on the CPU.
    Multi-node rendezvous is torchrun's (``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (picklable; ``obj`` itself on one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is set on any rank (one tiny collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, dist.ReduceOp.MAX if active() else None).item() > 0)


def barrier() -> None:
    if active():
        dist.barrier()


class StopSignal:
    """While training, SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 ask for a clean stop: finish the step,
    checkpoint, exit 0. A second SIGTERM or SIGINT ends the process at once (exit status 128 + the
    signal's number, no traceback): a stop that cannot wait, e.g. inside a long compile.

    A context manager: on leaving, the previous handlers come back, so a process that goes on after
    training (the demo samples, tests, notebooks) can be terminated again, and processes it forks
    later (a multiprocessing pool's workers) do not inherit a handler that ignores terminate()."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    ABORT_ON_SECOND = (signal.SIGTERM, signal.SIGINT)
    CHECK_EVERY = 16    # steps between the ranks' agreement on a stop (a host sync), world > 1

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._pid = os.getpid()

    def __enter__(self) -> "StopSignal":
        global _watched
        self._pid = os.getpid()
        for sig in self.SIGNALS:
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                continue        # started with Ctrl-C ignored (nohup, `cmd &`): leave it so
            self._previous[sig] = signal.signal(sig, self._handle)
        # Python runs a handler only between bytecodes of the main thread; one stuck in a C call (a
        # compile waiting on its workers) would not see a second signal. The C-level handler also
        # writes the signal's number to a wake-up socket, which a thread watches.
        self._wake, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._wake_w, _watched = wake_w, True
        threading.Thread(target=self._watch, args=(self._wake,), name="pdiff-stop-signal", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        global _watched
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_wakeup)
        _watched = False
        self._wake_w.close()
        self._wake.shutdown(socket.SHUT_RDWR)       # the watcher's recv returns: it ends

    def _watch(self, wake: socket.socket) -> None:
        """The first signal said and the second SIGTERM/SIGINT acted on, from a thread (see __enter__)."""
        said, count = False, 0
        while True:
            try:
                data = wake.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                if not said and int(os.environ.get("RANK", "0")) == 0:    # here: the main thread may be in C
                    os.write(2, f"pdiff train: {signal.Signals(signum).name}: finishing the step, then a checkpoint "
                                f"and snapshot; a second SIGTERM or Ctrl-C stops at once\n".encode())
                said = True
                count += signum in self.ABORT_ON_SECOND
                if count >= 2:
                    self._abort(signum)

    @staticmethod
    def _abort(signum: int) -> None:
        os.write(2, f"pdiff train: second {signal.Signals(signum).name}: stopping now, without a checkpoint; "
                    f"run the same command to resume from the last one\n".encode())
        os._exit(128 + signum)      # at once: no cleanup that could hang (a compile, a collective)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A forked child (a DataLoader worker) inherits the handler: Ctrl-C reaches the whole
            # process group, and the trainer decides; TERM ends the child as it would by default.
            if signum != signal.SIGINT:
                os._exit(128 + signum)
            return
        if self.requested and signum in self.ABORT_ON_SECOND:
            self._abort(signum)
        self.requested = True

    def should_stop(self, over_budget: bool, steps: int, device: torch.device) -> bool:
        """Whether every rank stops after this step (``steps``: steps taken in this run). One
        process stops at once; several must agree, which costs a host sync, so they compare
        notes every CHECK_EVERY steps only."""
        stopping = self.requested or over_budget
        if active():
            stopping = steps % self.CHECK_EVERY == 0 and any_rank(stopping, device)
        return stopping


_watched = False     # a StopSignal's wake-up socket is set in this process


def _forget_wakeup_in_child() -> None:
    """A forked child (a DataLoader worker) must not write its signals to the parent's wake-up
    socket: Ctrl-C reaches both, and the parent would count two."""
    if _watched:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:      # forked from a thread other than the main one: nothing was inherited there
            pass


os.register_at_fork(after_in_child=_forget_wakeup_in_child)


@torch.no_grad()
def check_replicas_agree(model: torch.nn.Module, device: torch.device) -> float:
    """Largest difference of any parameter between this rank and rank 0 (0 on one process).

    Run after each checkpoint: DDP keeps replicas equal, so anything else is a bug or a fault."""
    if not active():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def shutdown() -> None:
    """Leave the process group together: a rank that tears its connections down while a peer is
    still finishing a collective can bring that peer down (gloo aborts it)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        gc.collect()   # finished work objects still referenced by cycles go while the group lives
        dist.destroy_process_group()


@contextlib.contextmanager
def hold_run(run_dir: str | os.PathLike):
    """The job's lock on ``run_dir`` for the block: rank 0 takes it and every rank learns the
    outcome, so a refused torchrun job stops on every rank with the holder's name."""
    lock, refusal = None, None
    if rank() == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except (RunLocked, RunFolderError) as e:
            refusal = (type(e).__name__, str(e))
    refusal = broadcast_object(refusal)
    if refusal:
        raise (RunLocked if refusal[0] == "RunLocked" else RunFolderError)(refusal[1])
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
