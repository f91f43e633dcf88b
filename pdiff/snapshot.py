"""EMA snapshots (safetensors + the run's config) and reading models back for sampling.

A snapshot is one ``.safetensors`` file: the EDMPrecond state_dict (contiguous CPU tensors) and
metadata {"format": "pdiff-snapshot-1", "config": <to_dict(cfg) as JSON>, "images_seen": "..."},
written atomically with its sha256 beside it (``pdiff.checksum.save_verified``) and checked on load,
plus the EMA's description (``ema_mode``; ``ema_std`` and ``ema_gamma`` for power EMAs, see pdiff.ema).
``load_model`` also reads the trainer's checkpoints (pdiff.checkpoint's layout), taking their EMA
weights.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .checkpoint import MARKER, STATE_FILE, CheckpointError, complete_checkpoints, load_state
from .checksum import ChecksumError, save_verified, verify
from .config import Config, ConfigError, from_dict, to_dict
from .errors import UserError
from .model import build_model

FORMAT = "pdiff-snapshot-1"


class SnapshotError(UserError, ValueError):
    exit_code = 2


def snapshot_name(images_seen: int, suffix: str = "") -> str:
    """``ema-<images seen, 12 digits><suffix>.safetensors``; power EMAs add ``-<sigma_rel>``."""
    return f"ema-{int(images_seen):012d}{suffix}.safetensors"


def save_snapshot(path: str | os.PathLike, model: torch.nn.Module, cfg: Config, images_seen: int,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write atomically, with its checksum (``pdiff.checksum.save_verified``), readable as the umask
    allows (0644 under the usual 022) so others sharing the run folder can load it. ``metadata``:
    more string entries (the EMA's mode and width, a reconstruction's sources)."""
    from safetensors.torch import save
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {**(metadata or {}), "format": FORMAT, "config": json.dumps(to_dict(cfg)),
            "images_seen": str(int(images_seen))}
    save_verified(path, lambda f: f.write(save(tensors, metadata=meta)))
    return path


def _unwrap(state: dict) -> dict:
    """Drop the prefixes torch.compile (``_orig_mod.``) and DDP (``module.``) add to keys."""
    out = {}
    for k, v in state.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _build(cfg: Config, state: dict, source: str, device) -> torch.nn.Module:
    state = _unwrap(state)
    model = build_model(cfg)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise SnapshotError(f"{source}: weights do not fit the network its config describes (was it "
                            f"written by another version of pdiff?): {len(missing)} missing e.g. "
                            f"{missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
                            f"{len(wrong)} of another shape e.g. {wrong[:3]}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def _config_from(data, source: str) -> Config:
    try:
        return from_dict(data, source)
    except ConfigError as e:
        raise SnapshotError(f"{source}: its stored config is not valid for this pdiff: {e}") from None


def _images_in_name(path: Path) -> int:
    """The images seen in a snapshot's name: ema-<images>[-<sigma_rel>].safetensors (or the digits
    before .safetensors in another name)."""
    m = re.match(r"ema-(\d+)", path.name) or re.search(r"(\d+)\.safetensors$", path.name)
    return int(m.group(1)) if m else -1


def read_metadata(path: str | os.PathLike) -> dict:
    """A snapshot's metadata without reading its tensors (a file whose metadata lacks pdiff's format or
    the config is not a snapshot)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise SnapshotError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise SnapshotError(f"{path}: a safetensors file but not a pdiff snapshot (metadata format "
                            f"{meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A snapshot's tensors, checked against its checksum first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        verify(path)
        return load_file(str(path))
    except ChecksumError as e:
        raise SnapshotError(str(e)) from None
    except (SafetensorError, OSError) as e:
        raise SnapshotError(f"{path}: not a readable safetensors file ({e})") from None


def find_snapshot(path: str | os.PathLike) -> Path:
    """A snapshot file itself, or the newest snapshot (most images seen, by its name; then the newest
    file) in a folder: a run folder (its snapshots/) or a snapshots folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    folder = path / "snapshots" if (path / "snapshots").is_dir() else path
    found = sorted(folder.glob("*.safetensors"), key=lambda p: (_images_in_name(p), p.stat().st_mtime))
    if not found:
        raise SnapshotError(f"{path}: no snapshot (*.safetensors) in {folder}; pdiff train writes them as "
                            f"RUN/snapshots/ema-<images>.safetensors (train.snapshot_every_images)")
    newest = [p for p in found if _images_in_name(p) == _images_in_name(found[-1])]
    return _first_average(newest) if len(newest) > 1 else found[-1]


def _first_average(same_count: list[Path]) -> Path:
    """Of the power EMAs' snapshots at one count (ema-<images>-<sigma_rel>), the one the run itself
    samples with, ema.stds[0]; the newest file when the metadata does not say."""
    for p in same_count:
        try:
            meta = read_metadata(p)
            first = json.loads(meta["config"])["ema"]["stds"][0]
        except (SnapshotError, KeyError, IndexError, TypeError, ValueError):
            continue
        if "ema_std" in meta and float(meta["ema_std"]) == float(f"{first:.6g}"):
            return p
    return same_count[-1]


def load_snapshot(path: str | os.PathLike, device="cpu") -> tuple[torch.nn.Module, Config, dict]:
    """(EDMPrecond in eval mode, its Config, the metadata dict). ``path`` may be a run or snapshots
    folder: its newest snapshot is taken (the metadata's "found_in" says so)."""
    folder = Path(path) if Path(path).is_dir() else None
    path = find_snapshot(path)
    if not path.is_file():
        raise SnapshotError(f"snapshot {path} does not exist (snapshots are RUN/snapshots/*.safetensors)")
    state = read_tensors(path)          # the checksum, then the file itself,
    meta = read_metadata(path)          # then its format
    cfg = _config_from(json.loads(meta["config"]), str(path))
    meta["source"] = str(path)
    if folder is not None:
        meta["found_in"] = str(folder)
    return _build(cfg, state, str(path), device), cfg, meta


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or a run folder -> its newest COMPLETE checkpoint."""
    path = Path(path)
    if path.name == STATE_FILE and path.is_file():
        path = path.parent
    if not path.exists():
        raise SnapshotError(f"checkpoint {path} does not exist")
    if (path / STATE_FILE).exists():
        if not (path / MARKER).exists():
            raise SnapshotError(f"checkpoint {path} has no {MARKER} marker: it was not finished writing")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = complete_checkpoints(root)
    if not found:
        raise SnapshotError(f"{path}: no complete checkpoint (ckpt-*/ with {STATE_FILE} and {MARKER}) found "
                            f"in {root}")
    return found[-1]


def ema_weights(entry: dict) -> dict:
    """The model state_dict of a checkpoint's ``ema`` entry (pdiff.ema's state_dict): the half-life
    EMA's, or the first power EMA's."""
    return entry["profiles"][0] if "profiles" in entry else entry


def load_checkpoint(path: str | os.PathLike, device="cpu", weights: str = "ema"
                    ) -> tuple[torch.nn.Module, Config, dict]:
    """The model of a training checkpoint (EMA weights by default: with ema.mode=power, the first
    tracked profile's) from a checkpoint or run folder."""
    ckpt = find_checkpoint(path)
    try:
        state = load_state(ckpt)
    except CheckpointError as e:
        raise SnapshotError(f"{e}. Give an older checkpoint folder (--checkpoint RUN/checkpoints/ckpt-N) "
                            f"or a snapshot instead") from None
    for key in (weights, "config"):
        if key not in state:
            raise SnapshotError(f"{ckpt / STATE_FILE}: no {key!r} entry (keys: {sorted(state)})")
    cfg = _config_from(state["config"], str(ckpt))
    weights_state = ema_weights(state[weights]) if weights == "ema" else state[weights]
    meta = {"format": "pdiff-checkpoint", "images_seen": str(state.get("images_seen", "")),
            "source": str(ckpt), "weights": weights}
    return _build(cfg, weights_state, str(ckpt), device), cfg, meta


def load_model(snapshot=None, checkpoint=None, device="cpu") -> tuple[torch.nn.Module, Config, dict]:
    if (snapshot is None) == (checkpoint is None):
        raise SnapshotError("give exactly one of --snapshot FILE or --checkpoint DIR_OR_RUN")
    return load_snapshot(snapshot, device) if snapshot is not None else load_checkpoint(checkpoint, device)
