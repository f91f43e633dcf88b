"""The one place where sample sources are registered: ``build_pipeline`` (and `pdiff fid`) open
``data.path`` with ``open_source``, which looks the path's kind up in ``SOURCES``.

The kind of a path is the ``format`` field of its ``manifest.json`` when it is a folder with one
(``pdiff shard`` writes ``"pdiff-webdataset"``), else its suffix (``".npy"``). A source for a new kind
is a `SampleSource` subclass in its own module (see pipelines/sample_source.py) whose constructor takes
``(path, verify_checksums)``; add one line for it to ``SOURCES`` below. Code outside the package
registers with ``register_source``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pdiff.pipelines.sample_source import SampleSource, SourceError
from pdiff.pipelines.shards.format import FORMAT, MANIFEST, read_manifest
from pdiff.pipelines.shards.inputs import IMAGE_SUFFIXES
from pdiff.pipelines.remote import RemoteShardSet, is_url
from pdiff.pipelines.shards.reader import ShardSet

SOURCES: dict[str, Callable[[Path, bool], SampleSource]] = {
    FORMAT: ShardSet,           # a folder written by `pdiff shard`
}


def register_source(kind: str, opener: Callable[[Path, bool], SampleSource]) -> None:
    """Add a source from outside this package (a plugin, a test) to SOURCES under ``kind``."""
    if kind in SOURCES:
        raise ValueError(f"a sample source for {kind!r} is already registered (to {SOURCES[kind].__module__}); "
                         "pick another kind")
    SOURCES[kind] = opener


def source_kind(path: Path) -> str:
    if path.is_dir() and (path / MANIFEST).exists():
        return str(read_manifest(path).get("format"))
    return path.suffix.lower()


# What `pdiff shard` takes besides image files, to tell a user who points data.path at it what to
# run instead.
ARRAY_SUFFIXES = (".zip", ".npz", ".npy")




def not_shards_message(path: Path) -> str | None:
    """Why ``path`` (no manifest, no registered suffix) is not a dataset pdiff trains from, and
    the command that makes one from it; None when it looks like an unfinished shard folder."""
    out = f"shards/{path.stem or 'data'}"
    fix = (f"make shards from it with\n    pdiff shard {path} {out}\n(images of several sizes: add --resolution R "
           f"--transform center-crop) and train with data.path={out}")
    if path.is_file():
        if path.suffix.lower() in ARRAY_SUFFIXES + tuple(IMAGE_SUFFIXES):
            return f"{path} is a {path.suffix} file, not a folder of shards: {fix}"
        return None
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        return f"{path} is an empty folder: point data.path at a folder written by `pdiff shard`"
    if any(p.suffix == ".tar" for p in entries):
        return None           # shards without their manifest: the writer did not finish
    pictures = 0
    for p in entries[:64]:    # images at the top, or in class sub-folders
        children = p.iterdir() if p.is_dir() else [p]
        pictures += sum(1 for _, q in zip(range(16), children) if q.suffix.lower() in IMAGE_SUFFIXES)
        if pictures:
            return f"{path} holds images, not shards: {fix}"
    return None


def open_source(path: str | Path, verify_checksums: bool = False, cache_dir: str = "",
                cache_limit_gb: float = 0.0) -> SampleSource:
    """The registered source for ``path``, opened (``verify_checksums``: check the stored data
    against its checksums first, where the source keeps any). A URL (s3://, gs://, http(s)://) names
    shards in object storage: they are fetched into ``cache_dir`` as they are needed (pipelines/remote.py)."""
    if is_url(path):
        return RemoteShardSet(str(path), cache_dir=cache_dir, cache_limit_gb=cache_limit_gb)
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder (data.path should name a folder written by "
                          f"`pdiff shard`)")
    kind = source_kind(path)
    if kind not in SOURCES:
        known = ", ".join(repr(k) for k in SOURCES)
        message = not_shards_message(path) if not (path / MANIFEST).exists() else None
        if message:
            raise SourceError(message)
        if path.is_dir() and not (path / MANIFEST).exists():
            read_manifest(path)         # raises: the folder lacks the manifest `pdiff shard` writes last
        raise SourceError(f"{path}: no sample source is registered for {kind!r} (registered: {known}; "
                          f"see pipelines/sources.py)")
    return SOURCES[kind](path, verify_checksums)
