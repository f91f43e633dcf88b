"""Crash-safe, verified training checkpoints: RUN/checkpoints/ckpt-<images_seen:012d>/{state.pt,
state.pt.sha256, COMPLETE}.

A checkpoint is written into a temporary folder with its checksum (pdiff.checksum), flushed to disk,
renamed to its final name, and only then marked with COMPLETE (also flushed). A crash at any point
leaves either no folder under the final name or one without COMPLETE, which is ignored and cleaned
up; the previous checkpoint is never touched until a newer one is complete. Everything in state.pt
loads with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts; no pickled
code.

Loading checks the checksum, the format version and that the weights are finite; a resume takes the
newest checkpoint that passes and names each newer one that did not. Rotation keeps the newest
``keep`` checkpoints and, whatever their state, the newest one known good (loaded or written by
this process with finite weights), so a run that goes bad cannot rotate away its last good state.

``RunState`` saves and restores a run's stateful parts through one dict (EDM2's CheckpointIO): each
part's ``state_dict()`` under its name, plus what a resume is checked against.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import torch

from . import checksum, distributed
from .errors import UserError

MARKER = "COMPLETE"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)$")

# Settings a resumed run must share with its checkpoint (the rest, e.g. intervals or duration,
# may change between runs).
RESUME_KEYS = ["network", "data.resolution", "data.channels", "patch", "loss", "train.batch", "train.seed"]
# The parts of a checkpoint whose floating-point values must be finite for it to count as good.
FINITE_PARTS = ("model", "ema", "optimizer")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: incomplete, damaged (checksum, truncated, not a torch
    file), refused by weights_only, of another format version, or holding non-finite weights."""


class ResumeError(UserError):
    """A checkpoint that is fine but does not fit the run that wants to resume from it."""
    every_rank = True     # every rank checks the checkpoint rank 0 picked


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


def _why_torch_load_failed(e: Exception) -> str:
    """torch.load's message without its boilerplate: weights_only refusals bury the cause in a
    page of advice."""
    text = str(e)
    if "Weights only load failed" in text:
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith(("Please file an issue", "Check the documentation"))]
        return "refused by torch.load(weights_only=True): " + " ".join(lines)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def read_state(path: str | Path, map_location="cpu") -> dict:
    """The dict in a checkpoint's state.pt (``path``: the folder or the file), tensors and plain
    values only (``weights_only``); CheckpointError naming the file when it cannot be read."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist") from None
    except Exception as e:   # truncated, random bytes, pickled code: all the file's fault
        raise CheckpointError(f"{file} cannot be loaded ({_why_torch_load_failed(e)}): the file is damaged or "
                              f"was not written by pdiff") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a pdiff checkpoint's dict")
    return state


def load_state(path: str | Path, map_location="cpu") -> dict:
    """The state of the checkpoint folder ``path``: refused while it is incomplete, when state.pt
    does not match its checksum, or when its checksum is missing though the marker says one was
    written (one without a checksum from a pdiff before the marker said so loads unverified)."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {MARKER} marker): it was being "
                              f"written when the run stopped; use an older one")
    try:
        verified = checksum.verify(path / STATE_FILE)
    except (checksum.ChecksumError, OSError) as e:
        raise CheckpointError(str(e)) from None
    if not verified and marker_records_checksum(path):
        raise CheckpointError(f"{checksum.sidecar(path / STATE_FILE)} is missing, but {path / MARKER} says it was "
                              f"written: {path / STATE_FILE} cannot be verified and counts as damaged")
    return read_state(path, map_location)


def marker_records_checksum(path: Path) -> bool:
    """Whether the checkpoint's COMPLETE marker says a checksum was written with state.pt (every
    pdiff that writes the marker's ``sha256`` line; older ones wrote only the images seen)."""
    try:
        return any(line.startswith("sha256 ") for line in (path / MARKER).read_text().splitlines())
    except OSError:
        return False


def nonfinite_entries(state: dict, parts=FINITE_PARTS, limit: int = 3) -> list[str]:
    """Names of (at most ``limit``) floating-point tensors in ``state``'s ``parts`` holding NaN or inf."""
    bad: list[str] = []

    def walk(obj, name):
        if len(bad) >= limit:
            return
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")
    for part in parts:
        walk(state.get(part), part)
    return bad


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it needs, give or take its index)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _warn(text: str) -> None:
    print(f"pdiff: WARNING {text}", file=sys.stderr, flush=True)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)
        self.known_good: Path | None = None     # the newest checkpoint known good: never pruned

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.dir)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, state: dict, images_seen: int, good: bool = True) -> Path:
        """Write ``state`` as the checkpoint at ``images_seen``; ``good``: its weights are finite,
        so it may take over as the checkpoint rotation protects."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / folder_name(images_seen)
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            digest = checksum.save_verified(tmp / STATE_FILE,
                                            lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))
        except checksum.WriteFailed as e:
            shutil.rmtree(tmp, ignore_errors=True)
            need, free = tensor_bytes(state), shutil.disk_usage(self.dir).free
            raise CheckpointError(f"the checkpoint at {images_seen:,} images could not be written: {e}. "
                                  f"{STATE_FILE} needs about {need / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB are "
                                  f"free in {self.dir}; free space there (or lift the file size limit), then run "
                                  f"the same command to resume from {self.latest() or 'the start'}") from None
        if final.exists():  # an incomplete leftover of a crash at this very count, or one that failed to load
            shutil.rmtree(final)
        os.replace(tmp, final)
        checksum.fsync_dir(self.dir)
        with open(final / MARKER, "w") as f:
            f.write(f"{images_seen}\nsha256 {digest}\n")     # says a checksum was written: its loss is damage
            f.flush()
            os.fsync(f.fileno())
        checksum.fsync_dir(final)
        if good:
            self.known_good = final
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints and the newest known good one; drop
        leftovers of crashed writes."""
        done = self.complete()
        for old in done[:-self.keep]:
            if old != self.known_good:
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
        """The whole state to resume from: refused (CheckpointError) while the checkpoint is
        incomplete, when it does not match its checksum or cannot be read, or when another format
        version wrote it."""
        path = Path(path)
        state = load_state(path, map_location)
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path / STATE_FILE}: format version {state.get('format_version')} "
                                  f"is not {FORMAT_VERSION}, which this pdiff reads")
        return state

    def newest_good(self) -> tuple[Path, dict] | None:
        """The newest complete checkpoint that loads, verifies and holds finite weights, with its
        state; a warning names each newer one that does not, and why. None when there is no
        complete checkpoint; CheckpointError when none of them is good."""
        done = self.complete()
        problems = []
        for path in reversed(done):
            try:
                state = self.load(path)
                bad = nonfinite_entries(state)
                if bad:
                    raise CheckpointError(f"checkpoint {path} holds non-finite values (in {', '.join(bad)})")
            except CheckpointError as e:
                problems.append(str(e))
                _warn(f"{e}; trying the checkpoint before it")
                continue
            if problems:
                _warn(f"resuming from {path}, the newest good checkpoint; {len(problems)} newer one(s) "
                      f"skipped and left in place (the next checkpoint at the same count replaces it)")
            elif not checksum.recorded(path / STATE_FILE):
                _warn(f"{path / STATE_FILE} has no checksum (written before pdiff wrote them): not verified")
            return path, state
        if not done:
            return None
        raise CheckpointError(f"no usable checkpoint in {self.dir}: " + "; ".join(problems)
                              + f". Restore a good copy, or move {self.dir} away to start the run over")


def config_changes(before: dict, after: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value before, value after) of every setting that differs between two config
    dicts; a key only one side has counts as changed (None on the other)."""
    changes = []
    for k in list(before) + [k for k in after if k not in before]:
        a, b = before.get(k), after.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changes.append((f"{prefix}{k}", a, b))
    return changes


def check_resume_compatible(saved: dict, current_config: dict, where: Path) -> None:
    """Refuse to resume when a RESUME_KEYS setting changed. The number of processes may change:
    the global batch (train.batch) is a RESUME_KEYS setting, and every step's samples, crops and
    noise follow from it and the images seen, not from the number of processes."""
    for key in RESUME_KEYS:
        a, b = saved["config"], current_config
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            diff = "; ".join(f"{k} was {x!r} and is now {y!r}" for k, x, y in
                             (config_changes(a, b, key + ".") if isinstance(a, dict) and isinstance(b, dict)
                              else [(key, a, b)]))
            raise ResumeError(f"cannot resume from {where}: {diff}. Use the checkpoint's setting, or start a "
                              f"new run in another train.run_dir.")


class EveryRank:
    """A part whose state is each rank's own (the data pipeline): saved as the list of every
    rank's state, gathered to rank 0. Each rank loads its entry when the checkpoint was written by
    as many ranks as there are now; otherwise the part's ``regroup_states(states)`` derives this
    rank's state from all of them (elastic resume)."""

    def __init__(self, part):
        self.part = part

    def state_dict(self) -> list:
        return distributed.all_gather_object(self.part.state_dict())

    def load_state_dict(self, states: list) -> None:
        if len(states) == distributed.world_size():
            self.part.load_state_dict(states[distributed.rank()])
        else:
            self.part.load_state_dict(self.part.regroup_states(states))


class RunState:
    """A run's stateful parts (objects with ``state_dict`` / ``load_state_dict``), saved under
    their names in one checkpoint with the images seen, the world size and the config."""

    def __init__(self, run_dir: str | Path, config: dict, keep: int = 3, **parts):
        self.checkpoints = CheckpointManager(run_dir, keep)
        self.config, self.parts = config, parts
        self.written_by: int | None = None     # the number of processes that wrote the checkpoint resumed from
        self.resumed_config: dict | None = None    # the config in the checkpoint resumed from

    def resume(self) -> tuple[int, Path | None]:
        """Load the newest good checkpoint into the parts: (its images seen, its folder), or
        (0, None) when there is none. Rank 0 picks it (checksums, finite weights) and every rank
        loads that one, whatever number of processes wrote it (``written_by`` tells how many)."""
        found, problem = None, None
        if distributed.rank() == 0:
            try:
                found = self.checkpoints.newest_good()
            except CheckpointError as e:
                problem = str(e)
        path, problem = distributed.broadcast_object((str(found[0]) if found else None, problem))
        if problem:
            error = CheckpointError(problem)
            error.every_rank = True     # rank 0's finding, broadcast
            raise error
        if path is None:
            return 0, None
        path = Path(path)
        # The other ranks read the file rank 0 checked (marker, checksum, format version) without hashing it again.
        state = found[1] if found else read_state(path)
        check_resume_compatible(state, self.config, path)
        self.written_by = int(state["world_size"])
        self.resumed_config = state["config"]
        for name, part in self.parts.items():
            try:
                part.load_state_dict(state[name])
            except ValueError as e:     # a part that says why it cannot take this state (the EMA's mode)
                raise ResumeError(f"cannot resume from {path}: {name}: {e}") from None
        self.checkpoints.known_good = path
        return int(state["images_seen"]), path

    def save(self, images_seen: int) -> Path | None:
        """Every rank calls it (EveryRank parts gather); rank 0 writes the checkpoint atomically
        and returns its folder."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        final = None
        if distributed.rank() == 0:
            bad = nonfinite_entries(state)
            if bad:
                _warn(f"the checkpoint at {images_seen:,} images holds non-finite values (in {', '.join(bad)}); "
                      f"written, and {self.checkpoints.known_good or 'no earlier checkpoint'} is kept as the "
                      f"last good one")
            final = self.checkpoints.save({**state, "images_seen": images_seen, "world_size": distributed.world_size(),
                                           "config": self.config}, images_seen, good=not bad)
        distributed.barrier()
        return final
