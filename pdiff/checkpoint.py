"""Crash-safe training checkpoints: RUN/checkpoints/ckpt-<images_seen:012d>/{state.pt, COMPLETE}.

A checkpoint is written into a temporary folder, flushed to disk, renamed to its final name, and
only then marked with COMPLETE (also flushed). A crash at any point leaves either no folder under
the final name or one without COMPLETE, which is ignored and cleaned up; the previous checkpoint is
never touched until a newer one is complete. Everything in state.pt loads with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts; no pickled code.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

MARKER = "COMPLETE"
_NAME = re.compile(r"^ckpt-(\d{12})$")
FORMAT_VERSION = 1


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
        if not self.dir.exists():
            return []
        found = [p for p in self.dir.iterdir() if _NAME.match(p.name) and (p / MARKER).exists()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, state: dict, images_seen: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"ckpt-{images_seen:012d}"
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as f:
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
        newest = done[-1].name if done else ""
        for p in self.dir.iterdir():
            stale_tmp = p.name.startswith(".tmp-")
            incomplete = _NAME.match(p.name) and not (p / MARKER).exists() and p.name < newest
            if stale_tmp or incomplete:
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def load(path: str | Path, map_location="cpu") -> dict:
        path = Path(path)
        file = path / "state.pt" if path.is_dir() else path
        if path.is_dir() and not (path / MARKER).exists():
            raise RuntimeError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was being "
                               f"written when the run stopped; use an older one")
        state = torch.load(file, map_location=map_location, weights_only=True)
        if state.get("format_version") != FORMAT_VERSION:
            raise RuntimeError(f"checkpoint {file}: format version {state.get('format_version')} "
                               f"is not {FORMAT_VERSION}, which this pdiff reads")
        return state
