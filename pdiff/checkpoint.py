"""Crash-safe training checkpoints: RUN/checkpoints/ckpt-<images_seen:012d>/{state.pt, COMPLETE}.

A checkpoint is written into a temporary folder, flushed to disk, renamed to its final name, and
only then marked with COMPLETE (also flushed). A crash at any point leaves either no folder under
the final name or one without COMPLETE, which is ignored and cleaned up; the previous checkpoint is
never touched until a newer one is complete. Everything in state.pt loads with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts; no pickled code.

``RunState`` saves and restores a run's stateful parts through one dict (EDM2's CheckpointIO): each
part's ``state_dict()`` under its name, plus what a resume is checked against.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from . import distributed

MARKER = "COMPLETE"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)$")

# Settings a resumed run must share with its checkpoint (the rest, e.g. intervals or duration,
# may change between runs).
RESUME_KEYS = ["network", "data.resolution", "data.channels", "patch", "loss", "train.batch", "train.seed"]


def folder_name(images_seen: int) -> str:
    return f"ckpt-{images_seen:012d}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).exists() and (folder / STATE_FILE).exists()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints in ``root`` (RUN/checkpoints), oldest (fewest images) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def read_state(path: str | Path, map_location="cpu") -> dict:
    """The dict in a checkpoint's state.pt (``path``: the folder or the file), tensors and plain
    values only (``weights_only``)."""
    path = Path(path)
    return torch.load(path / STATE_FILE if path.is_dir() else path, map_location=map_location, weights_only=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.dir)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, state: dict, images_seen: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / folder_name(images_seen)
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # an incomplete leftover of a crash at this very count
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        with open(final / MARKER, "w") as f:
            f.write(f"{images_seen}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(final)
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop leftovers of crashed writes."""
        done = self.complete()
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        newest = int(_NAME.match(done[-1].name).group(1)) if done else -1
        for p in self.dir.iterdir():
            stale_tmp = p.name.startswith(".tmp-")
            m = _NAME.match(p.name)
            incomplete = m and not is_complete(p) and int(m.group(1)) < newest
            if stale_tmp or incomplete:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def load(path: str | Path, map_location="cpu") -> dict:
        """The whole state to resume from: refused while the checkpoint is incomplete or when
        another format version wrote it."""
        path = Path(path)
        file = path / STATE_FILE if path.is_dir() else path
        if path.is_dir() and not (path / MARKER).exists():
            raise RuntimeError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was being "
                               f"written when the run stopped; use an older one")
        state = read_state(file, map_location)
        if state.get("format_version") != FORMAT_VERSION:
            raise RuntimeError(f"checkpoint {file}: format version {state.get('format_version')} "
                               f"is not {FORMAT_VERSION}, which this pdiff reads")
        return state


def check_resume_compatible(saved: dict, current_config: dict, world_size: int, where: Path) -> None:
    """Refuse to resume when a RESUME_KEYS setting or the number of processes changed."""
    for key in RESUME_KEYS:
        a, b = saved["config"], current_config
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            raise SystemExit(f"cannot resume from {where}: {key} was {a} and is now {b}. Use the "
                             f"checkpoint's setting, or start a new run in another train.run_dir.")
    if saved["world_size"] != world_size:
        raise SystemExit(f"cannot resume from {where}: it was written by {saved['world_size']} "
                         f"processes and this run has {world_size}. Restart with the same number "
                         f"of processes (global batch and data order depend on it).")


class EveryRank:
    """A part whose state is each rank's own (the data pipeline): saved as the list of every
    rank's state, gathered to rank 0; each rank loads its entry."""

    def __init__(self, part):
        self.part = part

    def state_dict(self) -> list:
        return distributed.all_gather_object(self.part.state_dict())

    def load_state_dict(self, states: list) -> None:
        self.part.load_state_dict(states[distributed.rank()])


class RunState:
    """A run's stateful parts (objects with ``state_dict`` / ``load_state_dict``), saved under
    their names in one checkpoint with the images seen, the world size and the config."""

    def __init__(self, run_dir: str | Path, config: dict, keep: int = 3, **parts):
        self.checkpoints = CheckpointManager(run_dir, keep)
        self.config, self.parts = config, parts

    def resume(self) -> tuple[int, Path | None]:
        """Load the newest complete checkpoint into the parts: (its images seen, its folder), or
        (0, None) when there is none."""
        latest = self.checkpoints.latest()
        if latest is None:
            return 0, None
        state = self.checkpoints.load(latest)
        check_resume_compatible(state, self.config, distributed.world_size(), latest)
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        return int(state["images_seen"]), latest

    def save(self, images_seen: int) -> None:
        """Every rank calls it (EveryRank parts gather); rank 0 writes the checkpoint atomically."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        if distributed.rank() == 0:
            self.checkpoints.save({**state, "images_seen": images_seen, "world_size": distributed.world_size(),
                                   "config": self.config}, images_seen)
        distributed.barrier()
